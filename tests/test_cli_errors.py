"""Bad input to `python -m lxmert score | prepare | convert` (their main(argv), called in-process): exit code 2,
exactly one line `error: ...` on stderr naming the file, field or key, and nothing written. Each case is one
a hostile review found printing a traceback or several lines, or silently doing the wrong thing."""
from __future__ import annotations

import base64
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lxmert.data.prepare import main as prepare_main
from lxmert.data.score import main as score_main
from lxmert.modeling.convert import main as convert_main


def _refused(main, argv: list, capsys, *names) -> str:
    """Run a tool; it must exit 2 with one `error:` line that names every one of `names`."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _files(folder: Path) -> list[str]:
    """Everything under `folder` (temporaries included), to check that nothing was written."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------- score

def _annotation(qid, answers=("yes",) * 10, qtype="is the", atype="yes/no") -> dict:
    return {"question_id": qid, "image_id": 1, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": answers[0], "answers": [{"answer": a} for a in answers]}


PREDICTIONS = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}]


def _score_files(tmp_path: Path, predictions=PREDICTIONS, annotations=None) -> tuple[Path, Path]:
    anns = annotations if annotations is not None else [_annotation(1), _annotation(2, ("no",) * 10)]
    return _dump(tmp_path / "preds.json", predictions), _dump(tmp_path / "anns.json", anns)


@pytest.mark.parametrize("predictions, names", [
    ([1, 2, 3], ["prediction #0"]),                                         # ids instead of objects
    ([{"question_id": [1], "answer": "yes"}], ["prediction #0", "question_id"]),  # unhashable: TypeError
    ([{"question_id": True, "answer": "yes"}, {"question_id": 2, "answer": "no"}],  # true == 1: scored silently
     ["prediction #0", "question_id"]),
    ([{"question_id": 1, "answer": 3}, {"question_id": 2, "answer": "no"}], ["prediction #0", "answer"]),
])
def test_score_refuses_predictions_that_are_not_id_answer_pairs(tmp_path, capsys, predictions, names):
    preds, anns = _score_files(tmp_path, predictions)
    _refused(score_main, [preds, "--annotations", anns], capsys, preds, *names)
    assert not (tmp_path / "preds.scores.json").exists()


@pytest.mark.parametrize("field", ["answer_type", "question_type"])
def test_score_refuses_annotation_types_that_are_lists(tmp_path, capsys, field):
    preds, anns = _score_files(tmp_path, annotations=[_annotation(1), {**_annotation(2, ("no",) * 10), field: ["x"]}])
    _refused(score_main, [preds, "--annotations", anns], capsys, anns, "annotation #1", field)
    assert not (tmp_path / "preds.scores.json").exists()


def test_score_refuses_two_annotations_of_one_question(tmp_path, capsys):
    preds, anns = _score_files(tmp_path, annotations=[_annotation(1), _annotation(2, ("no",) * 10),
                                                      _annotation(2, ("yes",) * 10)])
    _refused(score_main, [preds, "--annotations", anns], capsys, anns, "annotation #2", "question_id 2")
    assert not (tmp_path / "preds.scores.json").exists()


def _prepared(folder: Path, questions=None, answers=None) -> Path:
    folder.mkdir()
    _dump(folder / "val.json", questions if questions is not None else [
        {"question_id": 1, "question_type": "is the", "answer_type": "yes/no"},
        {"question_id": 2, "question_type": "is the", "answer_type": "yes/no"}])
    _dump(folder / "val_answers.json", answers if answers is not None else {"1": ["yes"] * 10, "2": ["no"] * 10})
    return folder


def _loop(tmp_path: Path) -> Path:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path / "loop"


PREPARED = {  # case -> (make the --prepared folder, what the one line names besides the folder)
    "empty folder": (lambda t: (t / "empty").mkdir() or t / "empty", ["--prepared", "val.json"]),
    "questions as an object": (lambda t: _prepared(t / "p", questions={"1": {"question_id": 1}}), ["val.json", "list"]),
    "answers as a list": (lambda t: _prepared(t / "p", answers=[["yes"] * 10]), ["val_answers.json", "object"]),
    "answers as a string": (lambda t: _prepared(t / "p", answers={"1": "yes", "2": ["no"] * 10}),  # scored 0 silently
                            ["val_answers.json", "question_id 1"]),
    "a file as the folder": (lambda t: _dump(t / "hostname", "x"), ["--prepared", "not a folder"]),
    "a symlink loop": (_loop, ["--prepared", "not a folder"]),
}


@pytest.mark.parametrize("case", list(PREPARED))
def test_score_refuses_a_prepared_folder_it_cannot_read(tmp_path, capsys, case):
    make, names = PREPARED[case]
    folder = make(tmp_path)
    preds = _dump(tmp_path / "preds.json", PREDICTIONS)
    _refused(score_main, [preds, "--prepared", folder, "--split", "val"], capsys, folder, *names)
    assert not (tmp_path / "preds.scores.json").exists()


def test_score_refuses_a_system_file_as_the_prepared_folder(tmp_path, capsys):
    preds = _dump(tmp_path / "preds.json", PREDICTIONS)
    _refused(score_main, [preds, "--prepared", "/etc/hostname", "--split", "val"], capsys, "--prepared /etc/hostname")


def _read_only(folder: Path, monkeypatch) -> Path:
    """A folder nobody may write in; root, whom permissions do not stop, is refused as anyone else would be."""
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(folder))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folder / "scores.json"


OUTS = {
    "in a read-only folder": lambda t, mp: _read_only(t / "ro", mp),
    "under a file": lambda t, mp: _dump(t / "afile", "x") / "scores.json",
    "an existing folder": lambda t, mp: (t / "outdir").mkdir() or t / "outdir",
}


@pytest.mark.parametrize("case", list(OUTS))
def test_score_refuses_an_out_it_cannot_write(tmp_path, capsys, monkeypatch, case):
    preds, anns = _score_files(tmp_path)
    out = OUTS[case](tmp_path, monkeypatch)
    before = _files(tmp_path)
    try:
        _refused(score_main, [preds, "--annotations", anns, "--out", out], capsys, f"--out {out}")
        assert _files(tmp_path) == before
    finally:
        for folder in tmp_path.iterdir():
            if folder.is_dir():
                folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------- prepare

def _vqa_files(tmp_path: Path, qid=5) -> tuple[Path, Path]:
    questions = {"data_subtype": "train2014", "questions": [{"image_id": 1, "question": "Is it?", "question_id": 5}]}
    annotations = {"annotations": [{**_annotation(qid), "multiple_choice_answer": "yes"}]}
    return _dump(tmp_path / "q.json", questions), _dump(tmp_path / "a.json", annotations)


def test_prepare_vqa_refuses_annotation_question_ids_that_are_lists(tmp_path, capsys):
    q, a = _vqa_files(tmp_path, qid=[5])
    _refused(prepare_main, ["vqa", "--out", tmp_path / "out", "--split", "train", q, a, "--min-count", "1"], capsys,
             a, "annotation #0", "question_id")
    assert not (tmp_path / "out").exists()


def _tokenizer_args(tmp_path: Path, out: Path) -> list:
    return ["tokenizer", _dump(tmp_path / "train.json", [{"sent": "is it red?"}]), "--out", out]


@pytest.mark.parametrize("command", ["vqa", "tokenizer"])
def test_prepare_refuses_an_out_that_is_a_file(tmp_path, capsys, command):
    out = _dump(tmp_path / "afile", "keep me")
    q, a = _vqa_files(tmp_path)
    argv = (["vqa", "--out", out, "--split", "train", q, a, "--min-count", "1"] if command == "vqa"
            else _tokenizer_args(tmp_path, out))
    before = _files(tmp_path)
    _refused(prepare_main, argv, capsys, f"--out {out}", "file")
    assert out.read_text() == '"keep me"' and _files(tmp_path) == before


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def _six_fields(image_id: str, boxes: int = 2, dim: int = 4) -> str:
    """One line of the six-field bottom-up-attention TSV (without its line end)."""
    return "\t".join([image_id, "640", "480", str(boxes), _b64(np.tile([0.0, 0.0, 10.0, 10.0], (boxes, 1))),
                      _b64(np.ones((boxes, dim)))])


def test_prepare_features_refuses_an_image_id_of_non_ascii_digits(tmp_path, capsys):
    tsv = tmp_path / "a.tsv"
    tsv.write_text(_six_fields("²") + "\n" + _six_fields("1") + "\n")  # str.isdigit() takes '²', int() does not
    _refused(prepare_main, ["features", tsv, "--out", tmp_path / "store"], capsys, f"{tsv}, line 1", "image_id", "²")
    assert _files(tmp_path) == ["a.tsv"]


def _store(tmp_path: Path, capsys) -> Path:
    tsv = tmp_path / "a.tsv"
    tsv.write_text("".join(_six_fields(str(i)) + "\n" for i in (1, 2, 3)))
    assert prepare_main(["features", str(tsv), "--out", str(tmp_path / "store")]) == 0
    capsys.readouterr()
    return tmp_path / "store"


def test_feature_store_refuses_a_count_of_non_ascii_digits(tmp_path, capsys):
    from lxmert.core.errors import InputError
    from lxmert.data.features import FeatureStore

    store = _store(tmp_path, capsys)
    meta = json.loads((store / "meta.json").read_text())
    _dump(store / "meta.json", {**meta, "num_boxes": "²"})
    with pytest.raises(InputError, match="meta.json: field 'num_boxes' = '²' must be a positive integer"):
        FeatureStore(store)


@pytest.mark.parametrize("ends, line", [(["\r", "\r", "\r"], 1), (["\n", "\r", "\n"], 2)])
def test_prepare_features_refuses_carriage_return_line_ends(tmp_path, capsys, ends, line):
    tsv = tmp_path / "cr.tsv"
    tsv.write_bytes("".join(_six_fields(str(i)) + end for i, end in enumerate(ends, 1)).encode())
    _refused(prepare_main, ["features", tsv, "--out", tmp_path / "store"], capsys, f"{tsv}, line {line}", "\\r")
    assert _files(tmp_path) == ["cr.tsv"]
    crlf = tmp_path / "crlf.tsv"  # Windows line ends are still read
    crlf.write_bytes("".join(_six_fields(str(i)) + "\r\n" for i in (1, 2, 3)).encode())
    assert prepare_main(["features", str(crlf), "--out", str(tmp_path / "store")]) == 0
    assert len(json.loads((tmp_path / "store/img_ids.json").read_text())) == 3


def test_prepare_fingerprint_refuses_a_store_without_features(tmp_path, capsys):
    store = _store(tmp_path, capsys)
    (store / "features.npy").unlink()
    meta = (store / "meta.json").read_text()
    _refused(prepare_main, ["fingerprint", store], capsys, store / "features.npy")
    assert (store / "meta.json").read_text() == meta and _files(store) == ["boxes.npy", "img_ids.json", "meta.json"]


@pytest.mark.parametrize("option", ["--split", "--vocab-from"])
def test_prepare_vqa_refuses_a_split_given_twice(tmp_path, capsys, option):
    q, a = _vqa_files(tmp_path)
    twice = (["--split", "val", q, a, "--split", "val", q, a] if option == "--split"
             else ["--split", "train", q, a, "--vocab-from", "train", "--vocab-from", "train"])
    _refused(prepare_main, ["vqa", "--out", tmp_path / "out", *twice, "--min-count", "1"], capsys,
             f"{option} {twice[1]}", "twice")
    assert not (tmp_path / "out").exists()


def test_prepare_tokenizer_keeps_a_folder_that_is_not_empty_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    _dump(out / "val.json", [])
    argv = _tokenizer_args(tmp_path, out)
    _refused(prepare_main, argv, capsys, f"--out {out}", "--overwrite")
    assert _files(out) == ["val.json"]
    assert prepare_main([str(a) for a in argv] + ["--overwrite"]) == 0
    assert "vocab.txt" in _files(out) and "val.json" not in _files(out)
    (tmp_path / "empty").mkdir()  # an empty folder is no loss
    assert prepare_main([str(a) for a in _tokenizer_args(tmp_path, tmp_path / "empty")]) == 0


# ---------------------------------------------------------------------------------------------- convert

@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny pretraining model saved with the LXMERT release's key names, and the answer files."""
    from transformers import LxmertConfig, LxmertForPreTraining

    torch.manual_seed(0)
    config = LxmertConfig(vocab_size=30, hidden_size=8, num_attention_heads=2, intermediate_size=16, l_layers=1,
                          x_layers=1, r_layers=1, visual_feat_dim=6, num_qa_labels=3)
    state = {("bert." + k.removeprefix("lxmert.")) if k.startswith("lxmert.") else k: v.clone()
             for k, v in LxmertForPreTraining(config).state_dict().items()}
    folder = tmp_path_factory.mktemp("release")
    _dump(folder / "ans2label.json", {"a": 0, "b": 1})
    _dump(folder / "all_ans.json", ["a", "b", "c"])
    return folder, state


def _convert(release, tmp_path: Path, capsys, edit, *names) -> str:
    folder, state = release
    state = dict(state)
    edit(state)
    torch.save(state, tmp_path / "model_LXRT.pth")
    line = _refused(convert_main, ["--checkpoint", tmp_path / "model_LXRT.pth", "--answers", folder / "ans2label.json",
                                   "--pretrained-answers", folder / "all_ans.json", "--out", tmp_path / "out",
                                   "--num-attention-heads", "2"], capsys, *names)
    assert not (tmp_path / "out").exists()
    return line


def _set(key: str, make):
    return lambda state: state.__setitem__(key, make(state[key]))


@pytest.mark.parametrize("key, make", [
    ("bert.embeddings.word_embeddings.weight", lambda t: t.T.clone()),            # transposed
    ("bert.embeddings.word_embeddings.weight", lambda t: t[0].clone()),           # truncated to 1-d: ValueError
    ("bert.encoder.visn_fc.visn_fc.weight", lambda t: t[:, 0].clone()),           # IndexError
    ("bert.embeddings.position_embeddings.weight", lambda t: t[0, 0].clone()),    # 0-d: IndexError
    ("bert.encoder.layer.0.intermediate.dense.weight", lambda t: t.T.clone()),    # transposed
    ("answer_head.logit_fc.3.weight", lambda t: t[:, 0].clone()),                 # wrong rank: converted silently
    ("answer_head.logit_fc.3.bias", lambda t: t[0].clone()),                      # 0-d: IndexError
    ("obj_predict_head.decoder_dict.obj.bias", lambda t: t[0].clone()),           # 0-d: IndexError
])
def test_convert_names_a_tensor_of_the_wrong_shape(release, tmp_path, capsys, key, make):
    line = _convert(release, tmp_path, capsys, _set(key, make), key)
    assert line.startswith(f"error: checkpoint: {key} has shape "), line  # that tensor, not those it misfits


@pytest.mark.parametrize("stack, config_key", [("x_layers", "x_layers"), ("r_layers", "r_layers"),
                                               ("layer", "l_layers")])
def test_convert_refuses_a_checkpoint_without_a_layer_stack(release, tmp_path, capsys, stack, config_key):
    def drop(state):
        for key in [k for k in state if k.startswith(f"bert.encoder.{stack}.")]:
            del state[key]

    _convert(release, tmp_path, capsys, drop, f"bert.encoder.{stack}.", config_key, "missing")


class _Opens:
    """A pickle that, if unpickled unsafely, creates a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_convert_refuses_a_malicious_pickle_in_one_line_without_running_it(release, tmp_path, capsys):
    folder, _ = release
    marker = tmp_path / "ran"
    torch.save({"bert.x": _Opens(marker)}, tmp_path / "evil.pth")
    _refused(convert_main, ["--checkpoint", tmp_path / "evil.pth", "--answers", folder / "ans2label.json",
                            "--out", tmp_path / "out"], capsys, tmp_path / "evil.pth", "open")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_refuses_a_head_count_of_non_ascii_digits(release, tmp_path, capsys):
    folder, state = release
    torch.save(state, tmp_path / "model_LXRT.pth")
    _refused(convert_main, ["--checkpoint", tmp_path / "model_LXRT.pth", "--answers", folder / "ans2label.json",
                            "--out", tmp_path / "out", "--num-attention-heads", "²"], capsys,
             "--num-attention-heads ²")


# ---------------------------------------------------------------------------------------------- usage errors

TOOLS = {"score": score_main, "prepare": prepare_main, "convert": convert_main}
USAGE = [  # tool, argv, what the line names, the --help it points to
    ("score", ["p.json", "--bogus"], "--bogus", "python -m lxmert score"),
    ("score", ["--out", "x.json"], "predictions", "python -m lxmert score"),
    ("prepare", ["vqa", "--out", "o", "--bogus"], "--bogus", "python -m lxmert prepare"),
    ("prepare", ["vqa", "--split", "train", "q.json"], "--out", "python -m lxmert prepare vqa"),
    ("prepare", ["features", "a.tsv", "--out", "s", "--dtype", "int8"], "--dtype", "python -m lxmert prepare features"),
    ("prepare", ["nonsense"], "nonsense", "python -m lxmert prepare"),
    ("convert", ["--checkpoint", "c.pth", "--answers", "a.json", "--out", "o", "--bogus"], "--bogus",
     "python -m lxmert convert"),
    ("convert", ["--answers", "a.json", "--out", "o"], "--checkpoint", "python -m lxmert convert"),
]


@pytest.mark.parametrize("tool, argv, names, prog", USAGE)
def test_usage_errors_are_one_line(capsys, tool, argv, names, prog):
    with pytest.raises(SystemExit) as stop:
        TOOLS[tool](argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("error: ") and names in err, err
    assert err.rstrip().endswith(f"(see {prog} --help)"), err


@pytest.mark.parametrize("tool, argv", [("score", ["--help"]), ("prepare", ["--help"]), ("prepare", ["vqa", "--help"]),
                                        ("convert", ["--help"])])
def test_help_is_unchanged(capsys, tool, argv):
    with pytest.raises(SystemExit) as stop:
        TOOLS[tool](argv)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lxmert ") and "--help" in out
