"""The compress-and-debias driver on a tiny embedded benchmark: rows, exact mask sparsity per modality,
stage 3 keeping the mask, nothing recomputed on a rerun, and stage 2 on VisualBERT."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from lxmert.core.files import load_tensors, read_json
from lxmert.prune.masks import load_mask, measure_mask
from lxmert.studies.debias import run_debias

MODALITY_SETTING = {"language": 0.3, "vision": 0.5, "cross": 0.7, "pooler": 0.2}
TARGETS = {"s50": dict.fromkeys(["language", "vision", "cross", "pooler"], 0.5), "l30-v50-x70-p20": MODALITY_SETTING}


def _config(root: Path, experiment: str, extra: list[str] = ()):
    """The session's tiny experiment on the changing-priors splits, with a one-epoch debias grid."""
    grid = ["data.train=[cp_train]", "data.valid=cp_minival", "data.test=[test,cp_test]", "lottery.scope=layer",
            "debias.stage1_losses=[bce]", "debias.stage2_losses=[lpf]", "debias.sparsities=[0.5]",
            "debias.modality_sparsities=[{language: 0.3, vision: 0.5, cross: 0.7, pooler: 0.2}]",
            "debias.stage2_epochs=1",
            "debias.stage3_epochs=1", "debias.reset_every=3"]
    return tiny_config(root, experiment=experiment, extra=grid + list(extra))


@pytest.fixture(scope="module")
def study(embedded_root, tmp_path_factory):
    """One finished lxmert study in its own working folder: (folder, config, result)."""
    folder = tmp_path_factory.mktemp("debias")
    cfg = _config(embedded_root, "cp_tiny", ["checkpoints.keep=all"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        result = run_debias(cfg)
    return folder, cfg, result


def _seed_dir(folder: Path, experiment: str) -> Path:
    return folder / "models" / experiment / "seed_0"


def test_rows_cover_the_grid(study):
    folder, cfg, result = study
    got = sorted((r["setting"], r["stage"], r["sparsity_tag"], r["stage2_loss"]) for r in result["rows"])
    assert got == sorted([("bce", "full", "full", None), ("lottery", "lottery", "s50", None),
                          ("bce-lpf", "control", "full", "lpf")]
                         + [("bce-lpf", stage, tag, "lpf") for stage in ("stage2", "stage3") for tag in TARGETS])
    assert read_json(folder / "result" / "cp_tiny" / "debias.json") == result
    assert result["test_splits"] == ["test", "cp_test"]
    for r in result["rows"]:
        assert set(r["final"]) == set(r["best"]) == {"test", "cp_test"}
        for acc in list(r["final"].values()) + list(r["best"].values()):
            assert 0 <= acc["overall"] <= 100 and {"yes/no", "number", "other"} <= set(acc)
        assert set(r["blind"]) == {r["stage1_loss"], r["stage2_loss"] or r["stage1_loss"]}
        assert all(set(b) == {"cp_minival", "test", "cp_test"} for b in r["blind"].values())
        assert r["valid_split"] == "cp_minival" and 0 <= r["valid"] <= 100
        assert set(r["prunable_by_modality"]) == {"language", "vision", "cross", "pooler"}
    epochs = {r["stage"]: r["epochs"] for r in result["rows"]}
    assert epochs == {"full": 1, "stage2": 2, "stage3": 3, "control": 3, "lottery": 2}, "same compute as stage 3"
    md = (folder / "result" / "cp_tiny" / "debias_table.md").read_text()
    assert "| question-only (bag of words) bce |" in md and "| question-only (bag of words) lpf |" in md and "± 0.00" not in md
    types = (folder / "result" / "cp_tiny" / "debias_answer_types.md").read_text()
    assert "| setting | stage | target sparsity % | test yes/no | test number | test other | cp_test yes/no |" in types
    bce = [r for r in result["rows"] if r["setting"] == "bce" and r["stage"] == "full"]
    assert f"| bce | full | 0 | {bce[0]['final']['test']['yes/no']:.2f} |" in types  # one seed: its value
    assert "| question-only (bag of words) lpf | - | - |" in types
    for name in ("debias_table.md", "debias_table.png", "debias_answer_types.md", "debias_answer_types.png",
                 "debias_cp_test.png", "debias_test.png"):
        assert (folder / "result" / "cp_tiny" / name).stat().st_size > 0


def test_saved_masks_meet_their_per_modality_targets(study):
    folder, _, result = study
    for tag, target in TARGETS.items():
        mask, modalities = load_mask(_seed_dir(folder, "cp_tiny") / "bce-lpf" / tag / "stage2" / "mask.safetensors")
        assert set(modalities.values()) == set(target)
        report = measure_mask(mask, modalities)
        for modality, sparsity in target.items():
            assert report["by_modality"][modality] == pytest.approx(100 * sparsity, abs=0.1), (tag, modality)
        row = next(r for r in result["rows"] if r["stage"] == "stage2" and r["sparsity_tag"] == tag)
        # measured from the weights, the word embeddings' padding row (zero in every model) left out
        padding = mask["encoder.embeddings.word_embeddings.weight"][0]
        for modality, sparsity in target.items():
            names = [k for k, m in modalities.items() if m == modality]
            pruned = sum(int((~mask[k]).sum()) for k in names) - (int((~padding).sum()) if modality == "language" else 0)
            size = sum(mask[k].numel() for k in names) - (padding.numel() if modality == "language" else 0)
            assert row["measured_by_modality"][modality] == round(pruned / size, 6), (tag, modality)


def test_stage3_keeps_the_stage2_mask(study):
    folder, _, result = study
    for tag in TARGETS:
        setting = _seed_dir(folder, "cp_tiny") / "bce-lpf" / tag
        mask, _ = load_mask(setting / "stage2" / "mask.safetensors")
        weights = load_tensors(setting / "stage3" / "run" / "final" / "model.safetensors")
        pruned = sum(int((~m).sum()) for m in mask.values())
        zeros = sum(int((weights[name] == 0).sum()) for name in mask)
        assert pruned > 0 and zeros == pruned
        assert all(bool((weights[name][~m] == 0).all()) for name, m in mask.items())
        stage2 = load_tensors(setting / "stage2" / "pruned.safetensors")
        assert any(not torch.equal(weights[k], stage2[k]) for k in mask)  # stage 3 did train
    lottery = next(r for r in result["rows"] if r["stage"] == "lottery")
    assert lottery["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert lottery["lottery"]["schedule"] == "oneshot"  # pruned once from the BCE model, whatever the config says
    assert lottery["lottery"]["scope"] == "layer"  # the config's lottery.scope: every tensor pruned to the target
    [path] = (_seed_dir(folder, "cp_tiny") / "lottery").rglob("mask.safetensors")
    mask, _ = load_mask(path)
    assert all(float((~m).float().mean()) == pytest.approx(0.5, abs=0.5 / m.numel() + 1e-6) for m in mask.values())


def test_rerun_recomputes_nothing(study, monkeypatch):
    folder, cfg, result = study
    files = sorted(p for pattern in ("result.json", "summary.json", "*.safetensors")
                   for p in (folder / "models").rglob(pattern))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    monkeypatch.chdir(folder)
    again = run_debias(cfg)
    assert again["rows"] == result["rows"]
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert sorted(p for pattern in ("result.json", "summary.json", "*.safetensors")
                  for p in (folder / "models").rglob(pattern)) == files


def test_stage2_on_visualbert(embedded_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(embedded_root, "cp_vb", ["model.family=visualbert", "model.num_hidden_layers=1",
                                           "debias.stage2_losses=[bce]", "debias.modality_sparsities=[]",
                                           "debias.stage3=false", "debias.lottery_baseline=false",
                                           "debias.controls=false", "debias.prunable=[encoder.encoder.*,"
                                           "encoder.pooler.*,encoder.embeddings.visual_projection.*]"])
    result = run_debias(cfg)
    assert sorted((r["setting"], r["stage"]) for r in result["rows"]) == [("bce", "full"), ("bce-bce", "stage2")]
    mask, modalities = load_mask(_seed_dir(tmp_path, "cp_vb") / "bce-bce" / "s50" / "stage2" / "mask.safetensors")
    report = measure_mask(mask, modalities)
    assert set(report["by_modality"]) == {"vision", "cross", "pooler"}
    assert all(v == pytest.approx(50.0, abs=0.1) for v in report["by_modality"].values())


def test_vqa_vs_score_is_the_mean_of_the_ood_sets():
    from lxmert.studies.debias_report import debias_table

    def accs(values):
        return {k: {"overall": v} for k, v in values.items()}

    tests = {"test_iid": 70.0, "ood_qt": 40.0, "ood_kw": 50.0, "ood_ko": 66.0}
    row = {"setting": "bce", "stage": "full", "sparsity_tag": "full", "target_sparsity": 0.0, "epochs": 4,
           "measured_sparsity": 0.0, "valid": 71.0, "final": accs(tests), "best": accs(tests), "seed": 0,
           "blind": {"bce": accs({"val": 40.0, **{k: v / 2 for k, v in tests.items()}})}}
    header, body = debias_table({"test_splits": list(tests), "valid_split": "val", "rows": [row]})
    assert header[-2:] == ["ood_mean final", "ood_mean best"]
    assert body[0][-2:] == ["52.00", "52.00"]
    blind = [line for line in body if line[0] == "question-only (bag of words) bce"]
    assert len(blind) == 1 and blind[0][-2] == "26.00"  # question-only, same mean


def test_answer_type_table_is_per_type_mean_over_seeds():
    from lxmert.studies.debias_report import answer_type_table

    def row(seed, yes_no, other):
        final = {"cp_test": {"overall": 50.0, "yes/no": yes_no, "number": 10.0, "other": other}}
        return {"setting": "lmh", "stage": "full", "sparsity_tag": "full", "target_sparsity": 0.0, "epochs": 4,
                "measured_sparsity": 0.0, "valid": 50.0, "final": final, "best": final, "seed": seed,
                "blind": {"lmh": {"cp_test": {"overall": 5.0, "yes/no": 1.0, "number": 2.0}}}}

    header, body = answer_type_table({"test_splits": ["cp_test"], "valid_split": "val",
                                      "rows": [row(0, 30.0, 60.0), row(1, 40.0, 64.0)]})
    assert header == ["setting", "stage", "target sparsity %", "cp_test yes/no", "cp_test number", "cp_test other"]
    assert body[0] == ["lmh", "full", "0", "35.00 ± 5.00", "10.00 ± 0.00", "62.00 ± 2.00"]
    assert body[1] == ["question-only (bag of words) lmh", "-", "-", "1.00 ± 0.00", "2.00 ± 0.00", "-"]  # no 'other' questions


def test_checkpoints_change_no_mask_and_no_row(embedded_root, tmp_path, monkeypatch):
    """Stage 2 checkpointed every 2 steps learns exactly the masks and rows of stage 2 never checkpointed
    mid-epoch: the thresholds are reset on a schedule of steps, not because a checkpoint is written."""
    grid = ["debias.stage2_batch_size=30", "debias.stage2_epochs=2", "debias.stage2_lr=0.01", "debias.stage3=false", "debias.controls=false",
            "debias.lottery_baseline=false", "debias.modality_sparsities=[]"]
    outputs = {}
    for every in (0, 2):
        folder = tmp_path / f"every_{every}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        result = run_debias(_config(embedded_root, "ckpt", grid + [f"train.save_every_steps={every}"]))
        mask, _ = load_mask(_seed_dir(folder, "ckpt") / "bce-lpf" / "s50" / "stage2" / "mask.safetensors")
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in result["rows"]]
        outputs[every] = (rows, mask)
    (rows0, mask0), (rows2, mask2) = outputs[0], outputs[2]
    assert rows0 == rows2
    assert mask0.keys() == mask2.keys() and all(torch.equal(mask0[k], mask2[k]) for k in mask0)


def test_minimal_keep_drops_weights_and_changes_no_row(study, embedded_root, tmp_path, monkeypatch):
    """checkpoints.keep minimal (the default): the same rows as keeping everything; stage 2 keeps its masks and
    answer heads, from which its weights are rebuilt bit for bit; stage 3, control and lottery weights go; the
    stage-1 weights (the start of stage 2 and the controls) stay."""
    from lxmert.studies.debias import stage2_weights

    folder, _, reference = study
    monkeypatch.chdir(tmp_path)
    result = run_debias(_config(embedded_root, "cp_tiny"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "environment")} for r in rows]  # noqa
    assert strip(result["rows"]) == strip(reference["rows"])
    seed = _seed_dir(tmp_path, "cp_tiny")
    kept = {str(p.relative_to(seed)) for p in seed.rglob("*.safetensors")}
    assert "stage1_bce/run/final/model.safetensors" in kept and "stage1_bce/run/best/model.safetensors" in kept
    for tag in TARGETS:
        stage2 = seed / "bce-lpf" / tag / "stage2"
        assert {f"bce-lpf/{tag}/stage2/{f}" for f in ("mask.safetensors", "best_mask.safetensors",
                                                       "heads.safetensors")} <= kept
        assert not [k for k in kept if k.startswith((f"bce-lpf/{tag}/stage3/", f"bce-lpf/{tag}/stage2/run/"))]
        assert not (stage2 / "pruned.safetensors").exists() and not (stage2 / "best_pruned.safetensors").exists()
        for which, name in (("final", "pruned.safetensors"), ("best", "best_pruned.safetensors")):
            rebuilt = stage2_weights(seed / "stage1_bce/run/final/model.safetensors", stage2, which)
            saved = load_tensors(_seed_dir(folder, "cp_tiny") / "bce-lpf" / tag / "stage2" / name)
            assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved)
    assert not [k for k in kept if k.startswith(("control_", "lottery/")) and "mask" not in k]

