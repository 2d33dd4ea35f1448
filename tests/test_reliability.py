"""A killed study resumes to the same numbers; bad input stops the CLI with one line naming the culprit."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LOTTERY_EXTRA, cli_env, comparable, tiny_yaml

LEVEL = Path("models/tiny/seed_0/iterative_global")
HANG_AT_STEP = 6

# `python -m lxmert` with one change: after the checkpoint at step 6 of the low-magnitude 60 % level's
# run it announces itself and sleeps, so the SIGKILL lands in the middle of that level. (tests/test_crash.py
# kills at every file-system change instead, in forks; this one kills a real command-line process.)
HANGING_CLI = f"""
import pathlib, sys, time
from lxmert.train import trainer
save = trainer.Trainer._save_checkpoint
def save_then_hang(self):
    save(self)
    if self.run.folder.parent.name == "level_60" and self.run.folder.parent.parent.name == "low_magnitude" \\
            and self.step == {HANG_AT_STEP}:
        pathlib.Path("checkpointed").write_text("")
        time.sleep(600)
trainer.Trainer._save_checkpoint = save_then_hang
from lxmert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lxmert", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def _temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if ".lxmert-" in p.name]


def test_killed_lottery_resumes_to_the_same_results(lottery_run, embedded_root, tmp_path):
    _, _, reference = lottery_run
    extra = [*LOTTERY_EXTRA, "lottery.modes=[low_magnitude,random]", "train.save_every_steps=3"]
    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root, extra=extra)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HANGING_CLI, "lottery", "--config", str(config)], cwd=work,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (work / "checkpointed").exists():
            assert proc.poll() is None, f"the run ended early: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "the run never reached the level"
            time.sleep(0.05)
        assert list((work / LEVEL / "low_magnitude/level_60/run").glob("ckpt-*/trainer.pt"))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert (work / LEVEL / "low_magnitude/level_30/result.json").exists()
    assert not (work / LEVEL / "low_magnitude/level_60/result.json").exists()
    assert not (work / "result/tiny/lottery.json").exists()
    finished = [work / "models/tiny/seed_0/dense/run/final/summary.json",
                work / LEVEL / "low_magnitude/level_30/result.json"]
    stamps = [p.stat().st_mtime_ns for p in finished]

    done = _cli(["lottery", "--config", config], work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {LEVEL / 'low_magnitude/level_60/run/ckpt-'}{HANG_AT_STEP:09d}" in done.stdout
    assert f"at epoch 1, step {HANG_AT_STEP}" in done.stdout
    assert [p.stat().st_mtime_ns for p in finished] == stamps, "finished work is not redone"
    result = json.loads((work / "result/tiny/lottery.json").read_text())
    expected = [r for r in reference["rows"] if r["mode"] in ("low_magnitude", "random")]
    assert comparable(result["rows"]) == comparable(expected)
    assert result["dense"] == reference["dense"]
    assert not list((work / LEVEL / "low_magnitude/level_60/run").glob("ckpt-*"))
    assert not _temporaries(work)


def test_bad_config_key_is_one_error_line(embedded_root, tmp_path):
    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root)
    proc = _cli(["lottery", "--config", config, "train.lrr=0.1"], tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'train.lrr'" in lines[0]
    assert str(config) in lines[0]
    assert not (tmp_path / "models").exists() and not (tmp_path / "logs").exists()


def test_malformed_question_file_is_one_error_line(embedded_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(embedded_root, root)
    minival = root / "minival.json"
    minival.write_text(minival.read_text()[:5000])
    config = tiny_yaml(tmp_path / "tiny.yaml", root)
    proc = _cli(["finetune", "--config", config], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {minival}: malformed JSON at line 1")
    assert not (tmp_path / "models").exists() and not _temporaries(tmp_path)


# -- in-process command line: every bad input is one line on stderr, a non-zero code, nothing written -----

def _main(args: list, capsys) -> tuple[int, list[str]]:
    from lxmert.__main__ import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def _copy_root(embedded_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data" / "embedded"
    shutil.copytree(embedded_root, root)
    return root


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _store_like(src: Path, folder: Path, num_boxes: int, feat_dim: int, box_width: int = 4,
                scale: float = 1.0) -> Path:
    """A feature store with the images of `src` and the given sizes (zeros, or `src`'s scaled boxes)."""
    import numpy as np

    from lxmert.core.files import write_json
    from lxmert.data.features import FeatureStore

    store = FeatureStore(src)
    folder.mkdir(parents=True)
    boxes = np.zeros((len(store), num_boxes, box_width), np.float32)
    if box_width == 4 and num_boxes == store.num_boxes:
        boxes[:] = np.asarray(store._boxes) * scale
    np.save(folder / "features.npy", np.zeros((len(store), num_boxes, feat_dim), np.float32))
    np.save(folder / "boxes.npy", boxes)
    shutil.copy(src / "img_ids.json", folder / "img_ids.json")
    write_json(folder / "meta.json", {"num_images": len(store), "num_boxes": num_boxes, "feat_dim": feat_dim,
                                      "dtype": "float32"})
    return folder


def _bad_config(tmp_path, root):
    return ["--config", tiny_yaml(tmp_path / "tiny.yaml", root)]


BAD_OVERRIDES = {
    "unknown key": (["train.lrr=0.1"], "unknown key 'train.lrr'"),
    "wrong type": (["train.epochs=two"], "key 'train.epochs' must be int, got 'two'"),
    "sparsity 1": (["debias.sparsities=[0.5,1.0]"], "key 'debias.sparsities' = [0.5, 1.0] is out of range"),
    "negative level": (["lottery.levels=[-0.1,0.5]"], "key 'lottery.levels' = [-0.1, 0.5] is out of range"),
    "modality out of range": (["debias.modality_sparsities=[{language: 0.3, vision: 0.3, cross: 1.2, pooler: 0.3}]"],
                              "key 'debias.modality_sparsities' = [{'language': 0.3, 'vision': 0.3, 'cross': 1.2, "
                              "'pooler': 0.3}] is out of range"),
    "modality unnamed": (["debias.modality_sparsities=[[0.3,0.3,0.3,0.7]]"], "key 'debias.modality_sparsities' = "
                                                                           "[[0.3, 0.3, 0.3, 0.7]] is out of range"),
    "modality missing": (["debias.modality_sparsities=[{language: 0.3}]"], "exactly the keys language, vision"),
    "no stage-2 sparsity": (["debias.sparsities=[]"], "keys 'debias.sparsities' and 'debias.modality_sparsities' "
                                                      "are both empty"),
    "yaml syntax": (["seeds=[0,1"], "override 'seeds=[0,1': not valid YAML (line 1, column 5: expected ','"),
    "python tag": (["seeds=!!python/object/apply:os.system [ls]"], "not valid YAML (line 1, column 1: could not "
                                                                    "determine a constructor for the tag"),
    "seed beyond range": (["seeds=[100000000000000000000000]"], "key 'seeds' = [100000000000000000000000] is out "
                                                                "of range"),
    "seed expression": (["seeds=[10**23]"], "key 'seeds' = ['10**23'] is out of range"),
    "no training split": (["data.train=[]"], "key 'data.train' = [] is out of range"),
    "experiment is a path": (["experiment=../../x"], "key 'experiment' = '../../x' is out of range"),
    "experiment is absolute": (["experiment=/tmp/x"], "key 'experiment' = '/tmp/x' is out of range"),
    "hidden experiment": (["experiment=.x"], "key 'experiment' = '.x' is out of range"),
    "selection on a test split": (["data.valid=cp_test", "data.test=[test]"], "key 'data.valid' = 'cp_test' is "
                                                                             "out of range"),
    "valid also tested": (["data.valid=cp_minival", "data.test=[cp_minival]"], "is also in data.train or data.test"),
    "levels share a folder": (["lottery.levels=[0.5,0.500001]"], "key 'lottery.levels' = [0.5, 0.500001] is out"),
    "repeated level": (["lottery.levels=[0.5,0.5]"], "key 'lottery.levels' = [0.5, 0.5] is out of range"),
    "split name is a path": (["data.test=[/some/dir/mytest]"], "key 'data.test' = ['/some/dir/mytest'] is out of "
                                                               "range"),
    "valid split is a path": (["data.valid=../minival"], "key 'data.valid' = '../minival' is out of range"),
    "hidden size 2^40": (["model.hidden_size=1099511627776"], "key 'model.hidden_size' = 1099511627776 is out"),
    "sequence length 1e11": (["data.max_seq_length=100000000000"], "key 'data.max_seq_length' = 100000000000 is"),
    "experiment ends in a newline": (['experiment="x\\n"'], "key 'experiment' = 'x\\n' is out of range"),
    "removed model.export": (["model.export=out"], "key 'model.export' was removed: export a finished unit with"),
    "renamed blind_epochs": (["blind_epochs=2"], "key 'blind_epochs' is now 'blind.epochs'"),
}


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_config_value_is_one_error_line(case, embedded_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides, words = BAD_OVERRIDES[case]
    code, lines = _main(["debias", *_bad_config(tmp_path, embedded_root), *overrides], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert str(tmp_path / "tiny.yaml") in lines[0] or lines[0].startswith(f"error: override '{overrides[0]}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def _missing_image(root: Path) -> str:
    _edit_json(root / "minival.json", lambda qs: qs[:7] + [{**qs[7], "img_id": "COCO_nowhere_9"}] + qs[8:])
    return f"{root / 'minival.json'}: question #7"


def _empty_split(root: Path) -> str:
    (root / "test.json").write_text("[]\n")
    return f"{root / 'test.json'}: the split is empty"


def _truncated_vocab(root: Path) -> str:
    path = root / "trainval_ans2label.json"
    path.write_text(path.read_text()[:-20])
    return f"{path}: malformed JSON"


def _pixel_boxes(root: Path) -> str:
    _store_like(root / "features", root / "pixels", 8, 16, scale=640.0)
    return f"{root / 'pixels' / 'boxes.npy'}: boxes are not normalised to [0, 1]"


def _feature_dim(root: Path) -> str:
    _store_like(root / "features", root / "wide", 8, 24)
    return f"{root / 'wide' / 'meta.json'}: the feature store has feat_dim 24, the config (data.embedded.feat_dim) says 16"


def _box_count(root: Path) -> str:
    _store_like(root / "features", root / "few", 6, 16)
    return "the feature store has num_regions 6, the config (data.embedded.num_regions) says 8"


def _box_width(root: Path) -> str:
    _store_like(root / "features", root / "wide_boxes", 8, 16, box_width=5)
    return f"{root / 'wide_boxes' / 'boxes.npy'}: shape"


def _question_field(field, value):
    def spoil(root: Path) -> str:
        _edit_json(root / "minival.json", lambda qs: qs[:4] + [{**qs[4], field: value}] + qs[5:])
        return f"{root / 'minival.json'}: question #4"
    return spoil


def _score(value):
    def spoil(root: Path) -> str:
        path = root / "train.json"
        qs = json.loads(path.read_text())
        answer = next(iter(qs[6]["label"]))
        qs[6]["label"][answer] = value
        path.write_text(json.dumps(qs))  # json writes NaN as the bare word NaN, which json reads back
        return f"{path}: question #6 label of answer {answer!r} has score"
    return spoil


def _repeated_id(root: Path) -> str:
    _edit_json(root / "test.json", lambda qs: qs[:9] + [{**qs[9], "question_id": qs[2]["question_id"]}] + qs[10:])
    return f"{root / 'test.json'}: question #9 repeats question_id"


def _nan_features(root: Path) -> str:
    import numpy as np

    arr = np.load(root / "features" / "features.npy", mmap_mode="r+")
    arr[5, 2, 3] = np.nan
    arr.flush()
    return f"{root / 'features' / 'features.npy'}: image"


def _blind_tokenizer(root: Path) -> str:
    from transformers import BertTokenizer

    shutil.rmtree(root / "tokenizer")
    (root / "words.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    BertTokenizer(vocab=str(root / "words.txt")).save_pretrained(str(root / "tokenizer"))
    return "of the training questions' tokens to [UNK]: it cannot read them"


def _unlabelled(index):
    def spoil(root: Path) -> str:
        _edit_json(root / "minival.json", lambda qs: [{k: v for k, v in q.items() if k != "label" or index is not None
                                                        and i != index} for i, q in enumerate(qs)])
        if index is None:
            return f"{root / 'minival'}.json (data.valid): the validation split has no labels"
        return f"{root / 'minival.json'}: question #{index} (question_id"
    return spoil


BAD_DATA = {"img_id not in the store": (_missing_image, []),
            "one unlabelled validation question": (_unlabelled(3), []),
            "unlabelled validation split": (_unlabelled(None), []),
            "sent is a number": (_question_field("sent", 7), []),
            "img_id is a list": (_question_field("img_id", ["a"]), []),
            "label score is a string": (_question_field("label", {"yes": "1.0"}), []),
            "label score NaN": (_score(float("nan")), []),
            "label score -50": (_score(-50), []),
            "label score 1e30": (_score(1e30), []),
            "repeated question id": (_repeated_id, []),
            "NaN feature": (_nan_features, []),
            "tokenizer without the words": (_blind_tokenizer, []),
            "empty split": (_empty_split, []),
            "truncated vocabulary": (_truncated_vocab, []),
            "boxes in pixels": (_pixel_boxes, ["data.features=pixels"]),
            "feature dimension": (_feature_dim, ["data.features=wide"]),
            "box count": (_box_count, ["data.features=few"]),
            "box width": (_box_width, ["data.features=wide_boxes"])}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_error_line_and_writes_nothing(case, embedded_root, tmp_path, capsys, monkeypatch):
    root = _copy_root(embedded_root, tmp_path)
    spoil, overrides = BAD_DATA[case]
    words = spoil(root)
    monkeypatch.chdir(tmp_path)
    code, lines = _main(["finetune", *_bad_config(tmp_path, root), *overrides], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "models").exists() and not (tmp_path / "result").exists()
    assert not _temporaries(tmp_path)


def test_interrupt_is_one_line_and_exit_130(embedded_root, tmp_path, capsys, monkeypatch):
    from lxmert.studies import lottery

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lottery, "run_lottery", interrupted)
    code, lines = _main(["lottery", *_bad_config(tmp_path, embedded_root)], capsys)
    assert code == 130 and lines == ["error: interrupted; run the same command again to resume where it stopped"]


def test_output_folder_that_cannot_be_written_is_refused_before_work(embedded_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "result").write_text("a file where the result folder goes")
    code, lines = _main(["finetune", *_bad_config(tmp_path, embedded_root)], capsys)
    assert code == 2 and lines == ["error: cannot write to result/tiny: result is not a folder; fix the permissions "
                                   "or run elsewhere"]
    (tmp_path / "result").unlink()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == "." else real_access(p, mode))
    code, lines = _main(["finetune", *_bad_config(tmp_path, embedded_root)], capsys)
    assert code == 2 and lines == ["error: cannot write to models/tiny: . is not writable; fix the permissions or "
                                   "run elsewhere"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"], "nothing was started"


def _copy_study(lottery_run, tmp_path) -> tuple[Path, Path]:
    workdir, cfg, _ = lottery_run
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    config = tiny_yaml(tmp_path / "tiny.yaml", cfg.data.root, extra=LOTTERY_EXTRA)
    return work, config


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


LEVEL60 = "models/tiny/seed_0/iterative_global/random/level_60"
DAMAGE = {
    "truncated dense weights": (lambda w: _truncate(w / "models/tiny/seed_0/dense/run/final/model.safetensors"),
                                "dense/run/final/model.safetensors: unreadable weights file, truncated or corrupt"),
    "truncated init weights": (lambda w: _truncate(w / "models/tiny/seed_0/init.safetensors"),
                               "init.safetensors: unreadable weights file, truncated or corrupt"),
    "truncated mask": (lambda w: _truncate(w / LEVEL60 / "mask.safetensors"),
                       "level_60/mask.safetensors: unreadable weights file, truncated or corrupt"),
    "mask of zeros": (lambda w: _zero_mask(w / LEVEL60 / "mask.safetensors"),
                      "level_60/mask.safetensors: the mask prunes every weight"),
    "binary summary": (lambda w: (w / LEVEL60 / "run/final/summary.json").write_bytes(b"\x80\x81\xfe"),
                       "level_60/run/final/summary.json: not UTF-8 text"),
    "empty result": (lambda w: (w / LEVEL60 / "result.json").write_text("{}"),
                     "level_60/result.json: field 'mode' is missing (not a complete level result)"),
    "result is a list": (lambda w: (w / LEVEL60 / "result.json").write_text("[]"),
                         "level_60/result.json: expected a JSON object, got list"),
}


def _zero_mask(path: Path) -> None:
    from lxmert.prune.masks import load_mask, save_mask

    mask, modalities = load_mask(path)
    first = next(iter(mask))
    save_mask(path, {k: v if k == first else v & False for k, v in mask.items()}, modalities)
    mask, _ = load_mask(path)
    mask[first][:] = False
    import numpy as np
    import torch
    from safetensors import safe_open

    from lxmert.core.files import save_tensors

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    save_tensors(path, {k: torch.from_numpy(np.packbits(v.numpy().ravel())) for k, v in mask.items()}, meta)


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_study_file_is_one_error_line(case, lottery_run, tmp_path, capsys, monkeypatch):
    work, config = _copy_study(lottery_run, tmp_path)
    damage, words = DAMAGE[case]
    for path in (work / LEVEL60).glob("result.json"):
        if case in ("truncated mask", "mask of zeros", "binary summary", "truncated dense weights",
                    "truncated init weights"):
            path.unlink()  # the level must be visited again to read what was damaged
    damage(work)
    if case == "truncated dense weights" or case == "truncated init weights":
        shutil.rmtree((work / LEVEL60).parent)  # the chain is computed again from the dense model
    monkeypatch.chdir(work)
    code, lines = _main(["lottery", "--config", config], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not _temporaries(work)


def test_plots_of_rows_missing_keys_is_one_error_line(lottery_run, tmp_path, capsys, monkeypatch):
    work, config = _copy_study(lottery_run, tmp_path)
    _edit_json(work / "result/tiny/lottery.json", lambda r: {**r, "rows": [{"mode": "random"}] + r["rows"][1:]})
    monkeypatch.chdir(work)
    code, lines = _main(["plots", "--config", config], capsys)
    assert code == 2 and lines == ["error: result/tiny/lottery.json: row 0 has no field 'seed'; rerun the study to "
                                   "rebuild it"]


def test_answers_outside_the_vocabulary_are_counted_not_fatal(embedded_root, tmp_path):
    from conftest import tiny_config

    from lxmert.data.datasets import load_data

    root = _copy_root(embedded_root, tmp_path)
    _edit_json(root / "minival.json", lambda qs: [{**q, "label": {"no-such-answer": 1.0}} if i in (3, 9) else q
                                                  for i, q in enumerate(qs)])
    lines: list[str] = []
    data = load_data(tiny_config(root), log=lines.append)
    assert data.valid.split.out_of_vocab == 2 and data.train.split.out_of_vocab == 0
    assert [line for line in lines if "vocabulary" in line] == [
        f"minival: 2 of 150 questions have no answer in the vocabulary {root / 'trainval_ans2label.json'} "
        "(they count as wrong for every model)"]


def test_diverged_training_is_one_error_line(embedded_root, tmp_path, capsys, monkeypatch):
    from lxmert.core.errors import TrainingDiverged
    from lxmert.studies import dense

    def diverge(cfg):
        raise TrainingDiverged("dense seed 0: loss became nan at step 13 (epoch 2); last good checkpoint: x/last")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dense, "run_finetune", diverge)
    code, lines = _main(["finetune", *_bad_config(tmp_path, embedded_root)], capsys)
    assert code == 3 and lines == ["error: dense seed 0: loss became nan at step 13 (epoch 2); "
                                   "last good checkpoint: x/last"]


def test_full_disk_during_a_run_is_one_error_line(embedded_root, tmp_path, capsys, monkeypatch):
    """The first weights a real fine-tune saves hit a full disk: one line naming them, no temporary left."""
    from lxmert.core import files as io

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(io, "save_file", full)
    code, lines = _main(["finetune", *_bad_config(tmp_path, embedded_root)], capsys)
    assert code == 4 and len(lines) == 1, lines
    assert lines == ["error: [Errno 28] no space left on device while writing models/tiny/seed_0/init.safetensors; "
                     "init.safetensors was left as it was"]
    assert not _temporaries(tmp_path) and not list((tmp_path / "models").rglob("*.safetensors"))


# -- crash-safe writing --------------------------------------------------------------------------------

_NEVER_LEFT: list = []


def _killed_inside(manager) -> Path:
    """Enter an atomic writer and never leave it, as a SIGKILL would: its temporary stays behind. (The
    writer is kept referenced: collecting it would run its cleanup.)"""
    _NEVER_LEFT.append(manager)
    tmp = manager.__enter__()
    (tmp / "part" if tmp.is_dir() else tmp).write_text("half")
    return tmp


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    from lxmert.core.files import atomic_folder, atomic_path, remove_temporaries

    run = tmp_path / "models" / "run"
    stale = [_killed_inside(atomic_path(run / "best" / "model.safetensors")),
             _killed_inside(atomic_path(run / "result.json")), _killed_inside(atomic_folder(run / "final"))]
    old = run / ".ckpt-000000010.lxmert-4242-k3j_9x.old"
    (old / "ckpt-000000010").mkdir(parents=True)
    keep = [run / "best" / "notes.txt", run / ".hidden", run / "notes.tmp", run / ".a.short.tmp",
            run / ".mask.safetensors.abcdefgh.tmp", run / "x.safetensors.lxmert-1-abcdefgh.tmp",
            run / ".y.lxmert-12-ab.tmp"]
    for path in keep:
        path.write_text("")
    assert all(".lxmert-" in p.name for p in stale)
    assert remove_temporaries(run) == sorted(stale + [old])
    assert sorted(p for p in run.rglob("*") if p.is_file()) == sorted(keep), "a user's own .tmp files stay"
    assert remove_temporaries(run) == [] and remove_temporaries(tmp_path / "absent") == []

    data = tmp_path / "data"
    mine, other = _killed_inside(atomic_folder(data / "embedded")), _killed_inside(atomic_folder(data / "vqa"))
    assert remove_temporaries(data, of="embedded") == [mine] and other.exists()


def test_unit_cleans_only_its_own_folder_and_only_under_its_lock(tmp_path):
    """Two processes on one experiment: a temporary of a unit another process holds is never removed."""
    from lxmert.core.files import atomic_path
    from lxmert.core.locks import FileLock
    from lxmert.core.scheduler import Unit, _take

    def unit(name):
        return Unit(name=name, folder=tmp_path / name, work=lambda: None, finished=lambda: False, settings={"a": 1})

    held, free = unit("held"), unit("free")
    writing = _killed_inside(atomic_path(held.folder / "run" / "model.safetensors"))
    stale = _killed_inside(atomic_path(free.folder / "run" / "model.safetensors"))
    other_process = FileLock(held.folder / ".lock")
    assert other_process.acquire(blocking=False)
    try:
        assert _take(held, "x") is None, "a unit held elsewhere is not taken"
        assert writing.exists(), "and its temporaries are left alone"
        lock = _take(free, "x")
        assert lock is not None and not stale.exists() and (free.folder / "settings.json").exists()
        lock.release()
    finally:
        other_process.release()


def test_a_key_recorded_since_a_later_version_reads_as_its_old_value(tmp_path):
    """A study-B lottery unit recorded before it honoured lottery.scope computed with 'layer': the same
    setting now passes, another one is refused naming the key."""
    from lxmert.core.errors import InputError
    from lxmert.core.files import write_json
    from lxmert.core.scheduler import Unit, check_settings

    write_json(tmp_path / "settings.json", {"train.lr": 0.1})
    # (key, value, refusal expected or None); model.answer_prior: a unit recorded before the key existed
    # fine-tuned from the head as loaded (null)
    for key, value, refused in (("lottery.scope", "layer", None), ("lottery.scope", "global", "'layer' -> 'global'"),
                                ("model.answer_prior", None, None), ("model.answer_prior", 0.01, "None -> 0.01")):
        unit = Unit(name="seed_0/unit", folder=tmp_path, work=lambda: None, finished=lambda: False,
                    settings={"train.lr": 0.1, key: value})
        if refused is None:
            check_settings(unit, "x")
        else:
            with pytest.raises(InputError, match=f"{key} {refused}"):
                check_settings(unit, "x")


class _FullDisk(Exception):
    """What safetensors raises on a full disk (its error type is not an OSError)."""


def test_full_disk_in_any_writer_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    import builtins

    import torch

    from lxmert.core import files as io

    path = tmp_path / "last" / "model.safetensors"
    io.save_tensors(path, {"w": torch.ones(3)})

    def safetensors_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise _FullDisk("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io, "save_file", safetensors_full)
    with pytest.raises(OSError, match=rf"no space left on device while writing {path}; ") as info:
        io.save_tensors(path, {"w": torch.zeros(3)})
    assert info.value.errno == errno.ENOSPC
    assert torch.equal(io.load_tensors(path)["w"], torch.ones(3)) and not _temporaries(tmp_path)

    class FullFile:
        """A file whose writes fail once 100 bytes are in: torch.save turns that into a RuntimeError."""

        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    real_open = builtins.open
    monkeypatch.setattr(io, "open", lambda f, mode="r": FullFile(real_open(f, mode)) if "w" in mode
                        else real_open(f, mode), raising=False)
    state = tmp_path / "last" / "trainer.pt"
    with pytest.raises(OSError, match=rf"while writing {state}; trainer.pt was left as it was"):
        io.save_state(state, {"step": 3, "moments": torch.zeros(1000)})
    assert not state.exists() and not _temporaries(tmp_path)

    with pytest.raises(OSError, match=rf"while writing {tmp_path / 'store'}; ") as info:
        with io.atomic_folder(tmp_path / "store") as tmp:
            (tmp / "features.npy").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_setup_logging_twice_closes_the_old_file(embedded_root, tmp_path, monkeypatch):
    import logging

    from conftest import tiny_config

    from lxmert.core.logs import setup_logging
    from lxmert.core.paths import Experiment

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(embedded_root)
    logger = logging.getLogger("lxmert")
    setup_logging(cfg)
    first = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    setup_logging(cfg)
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    assert len(first) == len(files) == 1 and len(logger.handlers) == 2
    assert first[0].stream is None, "the replaced handler's file is closed"
    logger.info("once")
    assert (tmp_path / Experiment(cfg).log).read_text().count("once") == 1


def test_experiment_made_with_other_data_is_refused(embedded_root, tmp_path, monkeypatch):
    """Finished runs are never mixed with new data: models/<exp>/data.json records the question files and the
    feature-store rows the splits use. A store that gains images (test-server features prepared later) keeps
    the record; other features for a used image, or another question file, are refused."""
    import numpy as np
    from conftest import tiny_config

    from lxmert.core.errors import InputError
    from lxmert.data.datasets import load_data
    from lxmert.data.features import FeatureStore, StoreWriter
    from lxmert.studies.context import check_data_fingerprint

    root = _copy_root(embedded_root, tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(root)
    check_data_fingerprint(cfg, load_data(cfg, log=lambda _: None))
    recorded = json.loads((tmp_path / "models" / "tiny" / "data.json").read_text())
    assert str(root / "train.json") in recorded and f"{root / 'features'} rows of train" in recorded
    check_data_fingerprint(cfg, load_data(cfg, log=lambda _: None))  # the same data: accepted

    def rewrite_store(change_row: bool) -> None:
        old = FeatureStore(root / "features")
        feats, boxes, ids = np.array(old._features), np.array(old._boxes), list(old.ids)
        if change_row:
            feats[old.row(json.loads((root / "train.json").read_text())[0]["img_id"])] += 1.0
        extras = [e for e in ("COCO_test2015_000000000001", "COCO_test2015_000000000002") if e not in ids]
        shutil.rmtree(root / "features")
        writer = StoreWriter(root / "features", len(ids) + len(extras), old.num_boxes, old.feat_dim)
        for i, img in enumerate(ids):
            writer.add(img, feats[i], boxes[i])
        for extra in extras:
            writer.add(extra, np.zeros_like(feats[0]), boxes[0])
        writer.close()

    rewrite_store(change_row=False)  # two more images, every used row the same
    check_data_fingerprint(cfg, load_data(cfg, log=lambda _: None))
    rewrite_store(change_row=True)
    with pytest.raises(InputError, match=r"data.json: the runs of experiment 'tiny' were made with other data "
                                         r"\(.*rows of train differ\)"):
        check_data_fingerprint(cfg, load_data(cfg, log=lambda _: None))
    _edit_json(root / "train.json", lambda qs: qs[:-1])
    with pytest.raises(InputError, match=r"\(.*train.json differ"):
        check_data_fingerprint(cfg, load_data(cfg, log=lambda _: None))


def test_written_files_and_folders_follow_the_umask(tmp_path):
    """safetensors writes its own 0600 file and mkdtemp makes 0700 folders: both are set to what the umask allows."""
    import stat

    import torch

    from lxmert.core import files as io

    old = os.umask(0o022)
    try:
        io.UMASK = 0o022
        io.save_tensors(tmp_path / "w.safetensors", {"a": torch.ones(2)})
        io.write_json(tmp_path / "x.json", {})
        with io.atomic_folder(tmp_path / "store") as tmp:
            (tmp / "f").write_text("1")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
        io.UMASK = old
    assert modes == {"w.safetensors": 0o644, "x.json": 0o644, "store": 0o755}


# -- every check before the work (issue 28) ---------------------------------------------------------------

def test_a_level_that_prunes_everything_is_refused_before_any_training(embedded_root, tmp_path, capsys, monkeypatch):
    from lxmert.train import trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer.Trainer, "_epoch", lambda self: pytest.fail("no training may start"))
    code, lines = _main(["lottery", *_bad_config(tmp_path, embedded_root), "lottery.levels=[0.3,0.99999]"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: lottery.levels: sparsity 0.99999 prunes all ") and "global scope" in lines[0]
    code, lines = _main(["debias", *_bad_config(tmp_path, embedded_root), "experiment=b", "data.train=[cp_train]",
                         "data.valid=cp_minival", "data.test=[cp_test]", "debias.sparsities=[0.999999]"], capsys)
    assert code == 2 and len(lines) == 1 and "debias.sparsities: 0.999999 keeps none of the" in lines[0], lines
    assert not list(tmp_path.glob("models/*/seed_*"))


def test_a_question_only_lxmert_that_cannot_train_is_refused_before_any_training(embedded_root, tmp_path, capsys,
                                                                                   monkeypatch):
    """A fresh encoder (zero biases) with the image zeroed: constant inputs to every vision LayerNorm, gradients
    scaled by 1/sqrt(eps) per layer; with 5 + 5 vision layers (base size) they overflow at the first step."""
    from lxmert.train import trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer.Trainer, "_epoch", lambda self: pytest.fail("no training may start"))
    deep = ["model.r_layers=5", "model.x_layers=5"]
    for command, extra in (("lottery", []), ("debias", ["experiment=b", "data.train=[cp_train]",
                                                        "data.valid=cp_minival", "data.test=[cp_test]"])):
        code, lines = _main([command, *_bad_config(tmp_path, embedded_root), *deep, *extra], capsys)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("error: the question-only LXMERT (blind.lxmert) cannot train from these weights")
        assert "model.pretrained=null" in lines[0] and "blind.lxmert=false" in lines[0]
    assert not list(tmp_path.glob("models/*/seed_*"))


def test_a_pretrained_vocabulary_smaller_than_the_tokenizer_is_refused_before_work(embedded_root, tmp_path, capsys,
                                                                                     monkeypatch):
    from transformers import LxmertConfig, LxmertModel

    small = tmp_path / "small"
    LxmertModel(LxmertConfig(vocab_size=20, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1,
                             x_layers=1, r_layers=1, visual_feat_dim=16)).save_pretrained(small)
    monkeypatch.chdir(tmp_path)
    code, lines = _main(["finetune", *_bad_config(tmp_path, embedded_root), f"model.pretrained={small}"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"the pretrained model '{small}' (model.pretrained) has a vocabulary of 20" in lines[0]
    assert not list(tmp_path.glob("models/*/seed_*"))


def test_question_ids_are_written_back_as_the_file_gives_them(tiny_data):
    """A question file with string ids (other datasets than VQA use them) is read, and its predictions carry the
    same ids: no int() of an id after the training."""
    from dataclasses import replace

    from lxmert.data.datasets import VQADataset
    from lxmert.train.evaluation import predictions_json

    split = replace(tiny_data.valid.split, question_ids=[f"q{i}" for i in range(len(tiny_data.valid))])
    ds = VQADataset(split, tiny_data.store, tiny_data.num_answers, tiny_data.qtype_index)
    preds = predictions_json(ds, [0] * len(ds), tiny_data.vocab.label2ans)
    assert [p["question_id"] for p in preds[:2]] == ["q0", "q1"]
    assert [p["question_id"] for p in predictions_json(tiny_data.valid, [0] * 3, tiny_data.vocab.label2ans)] == \
        tiny_data.valid.split.question_ids[:3]


def test_embedded_root_on_a_file_writes_nothing_beside_it(embedded_root, tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    code, lines = _main(["finetune", *_bad_config(tmp_path, elsewhere / "notes.txt")], capsys)
    assert code == 2 and lines == [f"error: data.root {elsewhere / 'notes.txt'} is not a folder; set data.root to a "
                                   "new folder for the embedded benchmark"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt"]


def test_an_unreadable_poll_interval_is_one_line(embedded_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LXMERT_POLL_SECONDS", "abc")
    code, lines = _main(["finetune", *_bad_config(tmp_path, embedded_root)], capsys)
    assert code == 2 and lines == ["error: LXMERT_POLL_SECONDS='abc': give a number of seconds in (0, 3600]"]
    assert not (tmp_path / "models").exists()


def test_a_unit_folder_that_cannot_be_written_is_one_line(embedded_root, tmp_path, capsys, monkeypatch):
    """A unit folder made read-only (or removed) while a study runs: the file-system error names the path, one
    line, exit 2 (root ignores permission bits, so the write is made to fail the way the kernel does)."""
    import errno

    from lxmert.core import scheduler

    def read_only(path, obj, indent=1):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scheduler, "write_json", read_only)
    code, lines = _main(["finetune", *_bad_config(tmp_path, embedded_root)], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: [Errno 13] Permission denied: 'models/tiny/seed_0/dense/settings.json'; fix it")


def test_command_line_usage_errors_are_one_line(capsys):
    from lxmert.__main__ import main

    for argv in (["lotery"], ["lottery", "--workers", "two"], ["lottery", "--bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
        assert lines[0].endswith("(see python -m lxmert --help)")


def test_plots_of_a_row_without_a_test_split_is_one_line(tmp_path, capsys, monkeypatch):
    from conftest import tiny_config

    row = {"setting": "bce", "seed": 0, "stage": "full", "stage1_loss": "bce", "stage2_loss": None,
           "sparsity_tag": "full", "target_sparsity": 0.0, "epochs": 1, "measured_sparsity": 0.0,
           "measured_by_modality": {}, "prunable_by_modality": {}, "valid_split": "cp_minival", "valid": 50.0,
           "valid_best": 50.0, "final": {"cp_test": {"overall": 40.0}}, "best": {"cp_test": {"overall": 40.0}},
           "best_epoch": 1, "splits": ["cp_minival", "cp_test"], "blind": {}, "seconds": 1.0}
    short = {**row, "seed": 1, "final": {}, "best": {}}
    out = tmp_path / "result" / "b"
    out.mkdir(parents=True)
    (out / "debias.json").write_text(json.dumps({"experiment": "b", "valid_split": "cp_minival",
                                                 "test_splits": ["cp_test"], "seeds": [0, 1], "rows": [row, short]}))
    config = tmp_path / "b.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tiny_config(tmp_path, experiment="b").to_dict()))
    monkeypatch.chdir(tmp_path)
    code, lines = _main(["plots", "--config", config], capsys)
    assert code == 2 and lines == [f"error: {Path('result/b/debias.json')}: row 1 (bce full) has no 'final cp_test' "
                                   "accuracy, which other rows have; rerun the study to rebuild it"]


def test_files_written_inside_a_published_folder_follow_the_umask(tmp_path):
    """A writer that makes 0600 files (safetensors inside save_pretrained does) publishes them as the umask
    allows."""
    import stat

    from lxmert.core import files

    old = os.umask(0o022)
    try:
        files.UMASK = 0o022
        with files.atomic_folder(tmp_path / "export") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
        files.UMASK = old
    assert stat.S_IMODE((tmp_path / "export" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "export" / "sub").stat().st_mode) == 0o755


def test_a_dense_model_measures_zero_sparsity_with_embeddings_in_the_set(tiny_data, tiny_cfg):
    """The word embeddings' padding row is zero in every model: it is not counted as pruned."""
    from lxmert.core.config import STUDY_B_PRUNABLE
    from lxmert.modeling.vqa import build_model
    from lxmert.prune.masks import measure_weights
    from lxmert.prune.prunable import prunable_tensors

    model = build_model(tiny_cfg.model, len(tiny_data.tokenizer), 16, tiny_data.num_answers)
    prunable = prunable_tensors(model, STUDY_B_PRUNABLE)
    assert float(model.encoder.embeddings.word_embeddings.weight[0].detach().abs().sum()) == 0.0
    report = measure_weights(model, prunable)
    assert report["overall"] == 0.0 and report["zeros"] == 0

