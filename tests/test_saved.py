"""Finished units after a study: evaluate gives what the study recorded, predict writes a test-server file,
export gives a folder plain transformers code loads and scores to the recorded accuracy; and a study on real
data does not silently train on the CPU."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LOTTERY_EXTRA, tiny_yaml

LEVEL = "seed_0/iterative_global/low_magnitude/level_30"


def _main(args: list, capsys) -> tuple[int, str, list[str]]:
    from lxmert.__main__ import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


@pytest.fixture
def study(lottery_run, embedded_root, tmp_path, monkeypatch):
    """A copy of the tiny lottery study to run commands in, and its config as a file."""
    workdir, cfg, result = lottery_run
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    monkeypatch.chdir(work)
    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root, extra=LOTTERY_EXTRA)
    return work, config, result


def test_evaluate_gives_the_accuracy_the_study_recorded(study, capsys):
    work, config, result = study
    row = json.loads((work / "models/tiny" / LEVEL / "result.json").read_text())
    code, out, err = _main(["evaluate", "--config", config, "--unit", LEVEL], capsys)
    assert code == 0, err
    scores = json.loads(out[out.index("{"):])
    assert scores["test"] == row["tests"]["test"]
    assert scores["minival"]["overall"] == row["accuracy_retrained_best"]
    code, out, err = _main(["evaluate", "--config", config, "--unit", LEVEL, "--weights", "final",
                            "--split", "minival"], capsys)
    assert code == 0 and json.loads(out[out.index("{"):])["minival"] == row["retrained_by_type"]
    dense = json.loads((work / "models/tiny/seed_0/dense/result.json").read_text())
    code, out, _ = _main(["evaluate", "--config", config, "--unit", "seed_0/dense", "--split", "test"], capsys)
    assert code == 0 and json.loads(out[out.index("{"):])["test"] == dense["tests"]["test"]


def test_a_unit_that_is_not_there_is_one_line(study, capsys):
    _, config, _ = study
    code, _, err = _main(["evaluate", "--config", config, "--unit", "seed_0/dense/nope"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --unit seed_0/dense/nope: no finished unit")
    assert "seed_0/dense" in err[0]
    code, _, err = _main(["export", "--config", config, "--unit", "seed_0/dense"], capsys)
    assert code == 2 and err == ["error: export needs --out (the folder to write)"]


def test_predict_writes_one_answer_per_question_of_any_split(study, embedded_root, capsys):
    """The study's own test split gives the predictions the study wrote; a question file of data.root that is
    not among the config's splits (as a test-server split prepared later) gets one answer per question."""
    work, config, _ = study
    code, _, err = _main(["predict", "--config", config, "--unit", LEVEL, "--split", "test",
                          "--out", work / "submission.json"], capsys)
    assert code == 0, err
    answers = json.loads((work / "submission.json").read_text())
    assert answers == json.loads((work / "result/tiny/predictions" / LEVEL / "test.json").read_text())
    code, _, err = _main(["predict", "--config", config, "--unit", LEVEL, "--split", "cp_test"], capsys)
    assert code == 0, err
    questions = json.loads((embedded_root / "cp_test.json").read_text())
    answers = json.loads((work / "result/tiny/predictions" / LEVEL / "cp_test.json").read_text())
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(isinstance(a["answer"], str) for a in answers)
    code, _, err = _main(["predict", "--config", config, "--unit", LEVEL, "--split", "cp_test",
                          "model.hidden_size=64", "model.num_attention_heads=2"], capsys)
    assert code == 2 and "was made with other settings (model.hidden_size 32 -> 64)" in err[0], err


def test_export_loads_with_plain_transformers_and_scores_the_recorded_accuracy(study, embedded_root, capsys):
    work, config, _ = study
    row = json.loads((work / "models/tiny" / LEVEL / "result.json").read_text())
    out = work / "export"
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _main(["export", "--config", config, "--unit", LEVEL, "--out", out], capsys)
    assert code == 2 and "exists and is not empty; nothing is replaced" in err[0]
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
    code, _, err = _main(["export", "--config", config, "--unit", LEVEL, "--out", out], capsys)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "answers.json", "mask.safetensors", "export.json", "README.md",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    card = json.loads((out / "export.json").read_text())
    assert card["sparsity"]["overall"] == pytest.approx(100 * row["measured_sparsity"], abs=1e-3)
    assert card["accuracy"]["test"] == row["tests"]["test"]

    # plain transformers code, nothing of the project
    from transformers import BertTokenizer, LxmertForQuestionAnswering

    model = LxmertForQuestionAnswering.from_pretrained(out).eval()
    tokenizer = BertTokenizer.from_pretrained(out)
    questions = json.loads((embedded_root / "test.json").read_text())
    ids = json.loads((embedded_root / "features" / "img_ids.json").read_text())
    row_of = {img: i for i, img in enumerate(ids)}
    features = np.load(embedded_root / "features" / "features.npy")
    boxes = np.load(embedded_root / "features" / "boxes.npy")
    score = 0.0
    for start in range(0, len(questions), 200):
        batch = questions[start:start + 200]
        enc = tokenizer([q["sent"] for q in batch], padding="longest", truncation=True, max_length=20,
                        return_tensors="pt")
        rows = [row_of[q["img_id"]] for q in batch]
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           visual_feats=torch.from_numpy(features[rows]),
                           visual_pos=torch.from_numpy(boxes[rows])).question_answering_score
        for q, k in zip(batch, logits.argmax(1).tolist()):
            score += q["label"].get(model.config.id2label[k], 0.0)
    assert round(100 * score / len(questions), 4) == pytest.approx(row["tests"]["test"]["overall"], abs=1e-3)


def test_real_data_on_a_cpu_build_is_refused_unless_asked(tmp_path, monkeypatch, capsys):
    """A study on prepared data without CUDA stops with one line saying why and how to get the CUDA build;
    device=cpu runs it anyway (here it then stops at the missing data, after the device check)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(["finetune", "data.dataset=prepared", f"data.root={tmp_path / 'none'}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: a study on real data (data.dataset: prepared) would train on the CPU: ")
    assert "install the CUDA build (pip install --force-reinstall torch==2.13.0 --index-url" in err[0]
    assert err[0].endswith(") or set device=cpu to run on the CPU anyway")
    code, _, err = _main(["finetune", "data.dataset=prepared", f"data.root={tmp_path / 'none'}", "device=cpu"], capsys)
    assert code == 2 and "would train on the CPU" not in err[0] and "none" in err[0]
    code, _, err = _main(["finetune", "device=cuda"], capsys)
    assert code == 2 and err[0].startswith("error: device: cuda would train on the CPU: ")
    assert not Path(tmp_path / "models").exists()


def test_every_result_records_what_it_ran_on(lottery_run):
    workdir, _, result = lottery_run
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["gpus"] == 0
    assert env["precision"] == "fp32" and env["cpu"] and "commit" in env
    row = json.loads((workdir / "models/tiny" / LEVEL / "result.json").read_text())
    assert row["environment"] == env
    assert json.loads((workdir / "result/tiny/finetune.json").read_text())["environment"] == env
