"""Several processes on one experiment cooperate: each takes units the others do not hold, and the tables
(written by the last one to finish) equal those of one process."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import LOTTERY_EXTRA, cli_env, comparable, tiny_yaml


def _start(config, cwd):
    return subprocess.Popen([sys.executable, "-m", "lxmert", "lottery", "--config", str(config)], cwd=cwd,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_processes_share_a_study_and_match_one(lottery_run, embedded_root, tmp_path):
    reference, _, ref_result = lottery_run
    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root, extra=LOTTERY_EXTRA)
    procs = [_start(config, tmp_path) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    trained = [out.count(" | epoch 1/1 ") for out, _ in outputs]
    assert sum(trained) == 2 + 3 * 2, f"every run (dense, question-only, levels) trained once in all: {trained}"
    assert sum(t > 0 for t in trained) >= 2, f"the work was shared: {trained}"

    result = json.loads((tmp_path / "result" / "tiny" / "lottery.json").read_text())
    assert comparable(result["rows"]) == comparable(json.loads(json.dumps(ref_result["rows"])))
    for name in ("lottery_table.md", "lottery.csv"):
        mine, ref = ((d / "result" / "tiny" / name).read_text() for d in (tmp_path, reference))
        if name == "lottery.csv":  # wall-clock seconds differ
            mine, ref = (["|".join(c for i, c in enumerate(line.split(",")) if i != 11) for line in t.splitlines()]
                         for t in (mine, ref))
        assert mine == ref, name
    ft, ref_ft = (json.loads((d / "result" / "tiny" / "finetune.json").read_text()) for d in (tmp_path, reference))
    assert ft["mean"] == ref_ft["mean"]
    assert not [p for p in tmp_path.rglob("*") if ".lxmert-" in p.name]


def test_a_process_started_on_a_finished_study_only_writes_the_tables(lottery_run, tmp_path):
    reference, cfg, _ = lottery_run
    config = tiny_yaml(tmp_path / "tiny.yaml", cfg.data.root, extra=LOTTERY_EXTRA)
    proc = subprocess.run([sys.executable, "-m", "lxmert", "lottery", "--config", str(config)], cwd=reference,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert " | epoch " not in proc.stdout


def test_workers_of_one_command_share_the_study(lottery_run, embedded_root, tmp_path):
    """--workers 2 forks a second process after the data is loaded; the tables are those of one process."""
    reference, _, ref_result = lottery_run
    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root, extra=LOTTERY_EXTRA)
    proc = subprocess.run([sys.executable, "-m", "lxmert", "lottery", "--workers", "2", "--config", str(config)],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[worker 1] " in proc.stdout, "the forked worker took units"
    assert proc.stdout.count(" | epoch 1/1 ") == 2 + 3 * 2  # dense, question-only, 3 modes x 2 levels
    result = json.loads((tmp_path / "result" / "tiny" / "lottery.json").read_text())
    assert comparable(result["rows"]) == comparable(json.loads(json.dumps(ref_result["rows"])))


def test_check_validates_without_work(embedded_root, tmp_path):
    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root)
    ok = subprocess.run([sys.executable, "-m", "lxmert", "check", "--config", str(config)], cwd=tmp_path,
                        env=cli_env(), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lxmert", "check", "--config", str(config), "train.epochs=abc"],
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {config} + overrides: key 'train.epochs' must be int, got 'abc'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_a_two_phase_grid_runs_the_dense_units_first(lottery_run, embedded_root, tmp_path, monkeypatch, capsys):
    """Phase 1 (--only 'seed_*/dense') takes the dense units and nothing else, and writes no table; phase 2 takes
    the rest and writes the tables, the same as one process."""
    from lxmert.__main__ import main

    _, _, reference = lottery_run
    config = tiny_yaml(tmp_path / "tiny.yaml", embedded_root, extra=LOTTERY_EXTRA)
    monkeypatch.chdir(tmp_path)
    assert main(["lottery", "--config", str(config), "--only", "seed_*/dense"]) == 0
    seed = tmp_path / "models/tiny/seed_0"
    assert (seed / "dense/result.json").exists() and not (seed / "iterative_global").exists()
    assert not (tmp_path / "result/tiny/lottery.json").exists()
    assert main(["lottery", "--config", str(config)]) == 0
    rows = json.loads((tmp_path / "result/tiny/lottery.json").read_text())["rows"]
    assert comparable(rows) == comparable(reference["rows"])
