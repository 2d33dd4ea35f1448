"""The lottery driver: its files, rows, exact sparsities, nesting masks, and reruns that recompute nothing."""
from __future__ import annotations

import csv
import json
import math

import torch

from lxmert.core import logs
from lxmert.core.files import load_tensors, read_json
from lxmert.modeling.vqa import build_model
from lxmert.prune.magnitude import prune
from lxmert.prune.masks import full_mask, load_mask
from lxmert.prune.prunable import prunable_tensors
from lxmert.studies import context, lottery, lottery_report
from lxmert.train import trainer

MODES = ["low_magnitude", "random", "high_magnitude"]
ROW_KEYS = {"mode", "seed", "target_sparsity", "measured_sparsity", "accuracy_pruned", "accuracy_rewound",
            "accuracy_retrained", "accuracy_retrained_best", "accuracy_dense", "accuracy_blind"}


def _level(workdir, mode: str, level: int):
    return workdir / "models" / "tiny" / "seed_0" / "iterative_global" / mode / f"level_{level}"


def test_result_files(lottery_run):
    workdir, _, _ = lottery_run
    out = workdir / "result" / "tiny"
    expected = {"lottery.json", "lottery.csv", "lottery_table.md", "lottery_table.png", "lottery_all.png",
                "lottery_answer_types.md", "lottery_answer_types.png", "lottery_test_table.md", "lottery_test_table.png",
                "finetune.json", "finetune.png", "predictions", ".tables.lock"}
    expected |= {f"lottery_{m}.png" for m in MODES}
    assert {p.name for p in out.iterdir()} == expected
    predictions = sorted(str(p.relative_to(out / "predictions")) for p in (out / "predictions").rglob("*.json"))
    units = ["seed_0/dense"] + [f"seed_0/iterative_global/{m}/level_{x}" for m in MODES for x in (30, 60)]
    assert predictions == sorted(f"{u}/{split}.json" for u in units for split in ("minival", "test"))
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in expected if n.endswith(".png"))
    assert (workdir / "logs" / "tiny.log").exists() and (workdir / "logs" / "tiny.jsonl").exists()
    assert not [p for p in workdir.rglob("*") if p.name.endswith(".tmp")]


def test_rows_and_sparsities(lottery_run):
    workdir, _, result = lottery_run
    saved = json.loads((workdir / "result" / "tiny" / "lottery.json").read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["rows"]
    assert [(r["mode"], r["target_sparsity"]) for r in rows] == [(m, s) for m in MODES for s in (0.3, 0.6)]
    for r in rows:
        assert ROW_KEYS <= set(r) and r["seed"] == 0
        assert abs(r["measured_sparsity"] - r["target_sparsity"]) <= 0.001
        assert all(0 <= r[k] <= 100 for k in ROW_KEYS if k.startswith("accuracy"))
        assert r["accuracy_retrained_best"] >= r["accuracy_retrained"]
        assert set(r["measured_by_modality"]) == {"overall", "language", "vision", "cross", "pooler"}
        assert set(r["tests"]) == {"test"} and r["splits"] == ["minival", "test"]
        assert r["parent"] == (None if r["target_sparsity"] == 0.3 else 0.3)
        assert sum(r["prunable_by_modality"].values()) > 0
    assert (saved["schedule"], saved["scope"], saved["valid_split"]) == ("iterative", "global", "minival")


def test_baselines_are_reported(lottery_run):
    workdir, _, result = lottery_run
    ft = json.loads((workdir / "result" / "tiny" / "finetune.json").read_text())
    seed = ft["seeds"]["0"]
    assert result["dense"]["accuracy"]["mean"] == seed["final"]["overall"]
    assert result["dense"]["blind"]["mean"] == seed["blind"]["minival"]["overall"]
    assert all(r["accuracy_dense"] == seed["final"]["overall"] for r in result["rows"])
    assert all(r["accuracy_blind"] == seed["blind"]["minival"]["overall"] for r in result["rows"])
    assert set(seed["blind"]) == {"minival", "test"} and seed["blind"]["test"]["questions"] == 150
    assert {"final", "best", "best_epoch", "blind", "epochs", "tests"} <= set(seed)
    assert [e["epoch"] for e in seed["epochs"]] == [1] and seed["epochs"][0]["valid"] == seed["final"]["overall"]
    assert seed["tests"]["test"]["questions"] == 150 and ft["valid_split"] == "minival"


def test_predictions_json(lottery_run, embedded_root):
    workdir, _, _ = lottery_run
    preds = json.loads((workdir / "result/tiny/predictions/seed_0/iterative_global/random/level_60/minival.json")
                       .read_text())
    questions = json.loads((embedded_root / "minival.json").read_text())
    vocab = json.loads((embedded_root / "trainval_ans2label.json").read_text())
    assert isinstance(preds, list) and [p["question_id"] for p in preds] == [q["question_id"] for q in questions]
    assert all(set(p) == {"question_id", "answer"} and p["answer"] in vocab for p in preds)


def test_csv_and_table_come_from_the_json(lottery_run):
    workdir, _, result = lottery_run
    out = workdir / "result" / "tiny"
    with open(out / "lottery.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(result["rows"])
    for line, row in zip(table, result["rows"]):
        assert line["mode"] == row["mode"] and float(line["measured_sparsity"]) == row["measured_sparsity"]
        assert float(line["accuracy_retrained"]) == row["accuracy_retrained"]
        assert float(line["measured_language"]) == row["measured_by_modality"]["language"]
    md = (out / "lottery_table.md").read_text()
    low60 = next(r for r in result["rows"] if r["mode"] == "low_magnitude" and r["target_sparsity"] == 0.6)
    measured60 = 100 * sum(r["measured_sparsity"] for r in result["rows"] if r["target_sparsity"] == 0.6) / 3
    assert f"| 60 | {measured60:.2f} | {low60['accuracy_retrained']:.2f} |" in md, "one seed: no '± 0.00'"
    assert "± 0.00" not in md and "1 seed" in md
    assert "question-only" in md and f"{result['dense']['blind']['mean']:.2f}" in md
    types = (out / "lottery_answer_types.md").read_text()
    assert "| mode | sparsity % | minival yes/no | minival number | minival other |" in types
    by_type = low60["retrained_by_type"]
    assert (f"| low magnitude | 60 | {by_type['yes/no']:.2f} | {by_type['number']:.2f} | {by_type['other']:.2f} |"
            in types)
    dense = read_json(out / "finetune.json")["seeds"]["0"]
    assert f"| dense | 0 | {dense['final']['yes/no']:.2f} |" in types
    assert f"| question-only (bag of words) | - | {dense['blind']['minival']['yes/no']:.2f} |" in types


def test_masks_nest_match_the_weights_and_prune_the_dense_model(lottery_run, tiny_data):
    workdir, cfg, _ = lottery_run
    model = build_model(cfg.model, len(tiny_data.tokenizer), 16, tiny_data.num_answers)
    prunable = prunable_tensors(model)
    dense = workdir / "models" / "tiny" / "seed_0" / "dense" / "run" / "final" / "model.safetensors"
    model.load_state_dict(load_tensors(dense))
    first = load_mask(_level(workdir, "low_magnitude", 30) / "mask.safetensors")[0]
    expected = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.3, "global")
    assert all(torch.equal(first[k], expected[k]) for k in expected), "level 1 prunes the dense fine-tuned model"
    for mode in MODES:
        m30 = load_mask(_level(workdir, mode, 30) / "mask.safetensors")[0]
        m60, modalities = load_mask(_level(workdir, mode, 60) / "mask.safetensors")
        assert all(torch.all(m60[k] <= m30[k]) for k in m30)
        weights = load_tensors(_level(workdir, mode, 60) / "run" / "final" / "model.safetensors")
        assert all(torch.all(weights[k][~m60[k]] == 0) for k in m60), "pruned weights are zero after retraining"
        assert not list((_level(workdir, mode, 60) / "run").glob("ckpt-*")), "optimizer state is dropped when done"
        sparsity = json.loads((_level(workdir, mode, 60) / "sparsity.json").read_text())
        assert sparsity["zeros"] >= sum(int((~v).sum()) for v in m60.values())
        assert set(modalities.values()) == {"language", "vision", "cross", "pooler"}


def test_rerun_recomputes_nothing(lottery_run, monkeypatch):
    workdir, cfg, result = lottery_run
    monkeypatch.chdir(workdir)
    stamps = {p: p.stat().st_mtime_ns for p in (workdir / "models").rglob("*.json")}
    stamps |= {p: p.stat().st_mtime_ns for p in (workdir / "models").rglob("*.safetensors")}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished study must not train again")

    monkeypatch.setattr(trainer.Trainer, "_epoch", refuse)
    monkeypatch.setattr(context, "train_blind", refuse)
    monkeypatch.setattr(lottery, "prune", refuse)
    again = lottery.run_lottery(cfg)
    assert again["rows"] == json.loads(json.dumps(result["rows"]))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_redraw_rebuilds_the_table_from_json(lottery_run, monkeypatch):
    workdir, cfg, _ = lottery_run
    monkeypatch.chdir(workdir)
    md = workdir / "result" / "tiny" / "lottery_table.md"
    before = md.read_text()
    md.unlink()
    lottery_report.redraw(cfg)
    assert md.read_text() == before


def test_masks_of_another_prunable_set_are_refused(lottery_run, embedded_root, monkeypatch):
    import pytest
    from conftest import LOTTERY_EXTRA, tiny_config

    from lxmert.core.errors import InputError

    workdir, _, _ = lottery_run
    monkeypatch.chdir(workdir)
    cfg = tiny_config(embedded_root, extra=LOTTERY_EXTRA + ["lottery.prunable=[encoder.encoder.*,encoder.pooler.*,head.*]"])
    with pytest.raises(InputError, match=r"low_magnitude/settings.json: experiment 'tiny' ran .* with other settings "
                                         r"\(lottery.prunable"):
        lottery.run_lottery(cfg)
    logs.close()



def test_changed_settings_are_refused_before_any_work(lottery_run, tmp_path, monkeypatch):
    """train.lr / train.epochs / model.dropout change what finished units computed: one line, nothing redone."""
    import shutil

    import pytest
    from conftest import LOTTERY_EXTRA, tiny_config

    from lxmert.core.errors import InputError

    workdir, cfg, _ = lottery_run
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    monkeypatch.chdir(work)
    monkeypatch.setattr(trainer.Trainer, "_epoch", lambda self: pytest.fail("no work may start"))
    changed = tiny_config(cfg.data.root, extra=LOTTERY_EXTRA + ["train.lr=0.002", "model.dropout=0.2"])
    with pytest.raises(InputError, match=r"seed_0/dense/settings.json: experiment 'tiny' ran seed_0/dense with other "
                                         r"settings \(model.dropout 0.0 -> 0.2, train.lr 0.001 -> 0.002\); to run "
                                         r"these settings start a new experiment \(experiment=NEW_NAME\)"):
        lottery.run_lottery(changed)
    inserted = tiny_config(cfg.data.root, extra=LOTTERY_EXTRA + ["lottery.levels=[0.3,0.45,0.6]"])
    with pytest.raises(InputError, match=r"level_60/level.json: level 0.6 was pruned from level 0.3, lottery.levels "
                                         r"now prunes it from level 0.45; add levels only after the last one"):
        lottery.run_lottery(inserted)
    logs.close()


def test_initial_weights_made_with_other_settings_are_refused(lottery_run, tmp_path, monkeypatch):
    """Removing only the refused units leaves the seed's init.safetensors, from which every dense fine-tune and
    rewind starts: it records its settings and is refused too (here it shifts no answer bias, the new config
    does), before any training; the same settings pass."""
    import shutil

    import pytest
    from conftest import LOTTERY_EXTRA, tiny_config

    from lxmert.core.errors import InputError
    from lxmert.core.files import save_tensors, tensor_metadata

    workdir, cfg, _ = lottery_run
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    monkeypatch.chdir(work)
    init = work / "models" / "tiny" / "seed_0" / "init.safetensors"
    assert json.loads(tensor_metadata(init)["settings"])["model.answer_prior"] is None
    for unit in init.parent.iterdir():  # every unit of the seed (dense, question-only, the modes), not init
        if unit.is_dir():
            shutil.rmtree(unit)
    monkeypatch.setattr(trainer.Trainer, "_epoch", lambda self: pytest.fail("no work may start"))
    changed = tiny_config(cfg.data.root, extra=LOTTERY_EXTRA + ["model.answer_prior=0.01"])
    with pytest.raises(InputError, match=r"seed_0/init.safetensors: initial weights made under other settings "
                                         r"\(model.answer_prior None -> 0.01\); remove .*seed_0 to recompute"):
        lottery.run_lottery(changed)
    loaded = context.Context.load(tiny_config(cfg.data.root, extra=LOTTERY_EXTRA))
    assert loaded.init_weights(0) == init.relative_to(work)  # the same settings: accepted as it is
    # A file written before the record existed is compared with what the config builds: equal passes (and
    # leaves every RNG as it was), another answer_prior is refused.
    save_tensors(init, load_tensors(init))
    assert tensor_metadata(init) == {}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert loaded.init_weights(0) == init.relative_to(work)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(InputError, match=r"seed_0/init.safetensors: initial weights without a settings record "
                                         r"\(written by an older version\) that differ from what this config "
                                         r"builds"):
        context.Context.load(changed).init_weights(0)
    shifted = context.Context.load(tiny_config(cfg.data.root, experiment="tiny_prior",
                                                extra=LOTTERY_EXTRA + ["model.answer_prior=0.01"]))
    bias = load_tensors(shifted.init_weights(0))["head.3.bias"]  # a fresh head: zero biases, shifted once
    torch.testing.assert_close(bias, torch.full_like(bias, math.log(0.01 / 0.99)))
    logs.close()


def test_grid_keys_extend_the_study(lottery_run, tmp_path, monkeypatch):
    """A level added at the end and a new test split are computed; nothing finished is redone."""
    import shutil

    from conftest import LOTTERY_EXTRA, tiny_config

    workdir, cfg, result = lottery_run
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    monkeypatch.chdir(work)
    epochs = []
    real_epoch = trainer.Trainer._epoch
    monkeypatch.setattr(trainer.Trainer, "_epoch", lambda self: epochs.append(self.spec.tag) or real_epoch(self))
    more = tiny_config(cfg.data.root, extra=LOTTERY_EXTRA + ["lottery.modes=[low_magnitude]",
                                                             "lottery.levels=[0.3,0.6,0.8]", "data.test=[test,cp_test]"])
    extended = lottery.run_lottery(more)
    assert epochs == ["seed 0 low_magnitude 80%"], "only the new level trains"
    rows = {(r["mode"], r["target_sparsity"]): r for r in extended["rows"]}
    old = {(r["mode"], r["target_sparsity"]): r for r in result["rows"]}
    assert set(rows) == {("low_magnitude", x) for x in (0.3, 0.6, 0.8)}
    for key in (("low_magnitude", 0.3), ("low_magnitude", 0.6)):
        assert rows[key]["accuracy_retrained"] == old[key]["accuracy_retrained"]
        assert set(rows[key]["tests"]) == {"test", "cp_test"}, "the new test split is evaluated"
    assert (work / "result/tiny/predictions/seed_0/dense/cp_test.json").exists()
    logs.close()


def test_original_protocol_preset_on_the_tiny_study(embedded_root, tmp_path, monkeypatch):
    """run/configs/vqa_v2_original.yaml's lottery and training keys on the tiny study: one-shot from the best
    checkpoint, rounds of 10 % of each tensor's survivors (overshooting the level), the original's prunable set
    with biases, LayerNorms and the QA head, masks that regrow while retraining, the original's "high
    magnitude", one dense model for every seed, BertAdam."""
    from conftest import REPO, tiny_config

    from lxmert.core.config import load_config

    original = load_config(REPO / "run/configs/vqa_v2_original.yaml")
    lc = original.lottery
    patterns = "[" + ",".join(lc.prunable) + "]"
    cfg = tiny_config(embedded_root, experiment="original", epochs=2, extra=[
        "seeds=[0,1]", "lottery.modes=[low_magnitude,original_high]", "lottery.levels=[0.2,0.5]",
        f"lottery.schedule={lc.schedule}", f"lottery.scope={lc.scope}", f"lottery.prune_from={lc.prune_from}",
        f"lottery.prunable={patterns}", f"lottery.enforce_masks={lc.enforce_masks}",
        f"lottery.prune_all_parameters={lc.prune_all_parameters}", f"lottery.original_high_level={lc.original_high_level}",
        f"train.optimizer={original.train.optimizer}", f"train.dense_seed={original.train.dense_seed}",
        "checkpoints.keep=all"])
    monkeypatch.chdir(tmp_path)
    result = lottery.run_lottery(cfg)
    rows = {(r["mode"], r["seed"], r["target_sparsity"]): r for r in result["rows"]}
    assert all(r["parent"] is None for r in result["rows"]), "every level from the dense model"
    seeds = result["dense"]["per_seed"]
    assert seeds["0"] == seeds["1"], "the fine-tune ignores its seed: one dense model"
    level = tmp_path / "models/original/seed_0/oneshot_survivors"
    mask, modalities = load_mask(level / "low_magnitude/level_20/mask.safetensors")
    pruned = sum(int((~m).sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert abs(pruned - 0.271) < 0.005, "three rounds of 10 %"
    assert rows[("low_magnitude", 0, 0.2)]["measured_sparsity"] < pruned / 2, "the optimizer regrew pruned weights"
    assert "encoder.encoder.visn_fc.visn_fc.weight" in mask and "encoder.encoder.visn_fc.visn_fc.bias" not in mask
    assert "encoder.encoder.visn_fc.box_fc.weight" not in mask and "head.3.bias" not in mask
    assert {"head.0.weight", "head.2.weight", "head.3.weight"} <= set(mask) and "head" in modalities.values()
    assert any("LayerNorm" in k for k in mask) and any(k.endswith(".bias") for k in mask)
    high, _ = load_mask(level / "original_high/level_20/mask.safetensors")
    low_80 = prune("low_magnitude", *_model_and_prunable(cfg, tmp_path, lc), 0.8, "survivors")
    assert all(int((~high[k]).sum()) == int(low_80[k].sum()) for k in high), "mirrored: as many as level 80 keeps"


def _model_and_prunable(cfg, tmp_path, lc):
    """The dense model of seed 0 at its best checkpoint, its prunable set and a full mask (what a level prunes)."""
    from lxmert.data.datasets import load_data

    data = load_data(cfg, log=lambda _: None)
    model = build_model(cfg.model, len(data.tokenizer), 16, data.num_answers)
    model.load_state_dict(load_tensors(tmp_path / "models/original/seed_0/dense/run/best/model.safetensors"))
    prunable = prunable_tensors(model, lc.prunable, lc.prune_all_parameters)
    return model, prunable, full_mask(model, prunable)
    logs.close()


def test_minimal_keep_drops_level_weights_and_changes_no_row(lottery_run, embedded_root, tmp_path, monkeypatch):
    """checkpoints.keep minimal (the default) gives the rows of keeping everything; a level keeps its mask,
    result and predictions; of the levels' weights only the last level's final ones stay (an iterative chain
    extended later prunes from them); the seed's initial and dense weights stay."""
    from conftest import LOTTERY_EXTRA, comparable, tiny_config

    _, _, reference = lottery_run
    monkeypatch.chdir(tmp_path)
    minimal = [x for x in LOTTERY_EXTRA if not x.startswith("checkpoints.")]
    result = lottery.run_lottery(tiny_config(embedded_root, extra=minimal))
    logs.close()
    assert comparable(result["rows"]) == comparable(reference["rows"])
    seed = tmp_path / "models" / "tiny" / "seed_0"
    kept = sorted(str(p.relative_to(seed)) for p in seed.rglob("*.safetensors"))
    chains = [f"iterative_global/{mode}" for mode in ("high_magnitude", "low_magnitude", "random")]
    assert kept == sorted(["dense/run/best/model.safetensors", "dense/run/final/model.safetensors",
                           "init.safetensors"] + [f"{c}/level_{p}/mask.safetensors" for c in chains for p in (30, 60)]
                          + [f"{c}/level_60/run/final/model.safetensors" for c in chains])
