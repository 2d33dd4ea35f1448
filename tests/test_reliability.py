"""A killed study resumes to the same numbers; bad input stops the CLI with one line naming the culprit."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import LOTTERY_EXTRA, cli_env, comparable, tiny_yaml

LEVEL = Path("models/tiny/seed_0/iterative_global")
HANG_AT_STEP = 6

# `python -m lxmert` with one change: after the checkpoint at step 6 of the low-magnitude 60 % level's
# run it announces itself and sleeps, so the SIGKILL lands in the middle of that level, never mid-write.
HANGING_CLI = f"""
import pathlib, sys, time
from lxmert import training
save = training.Trainer._save_last
def save_then_hang(self):
    save(self)
    if self.folder.parent.name == "level_60" and self.folder.parent.parent.name == "low_magnitude" \\
            and self.step == {HANG_AT_STEP}:
        pathlib.Path("checkpointed").write_text("")
        time.sleep(600)
training.Trainer._save_last = save_then_hang
from lxmert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lxmert", *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def _temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.name.endswith(".tmp")]


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
        assert (work / LEVEL / "low_magnitude/level_60/run/last/trainer.pt").exists()
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
    finished = [work / "models/tiny/seed_0/dense/done.json", work / LEVEL / "low_magnitude/level_30/result.json"]
    stamps = [p.stat().st_mtime_ns for p in finished]

    done = _cli(["lottery", "--config", config], work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {LEVEL / 'low_magnitude/level_60/run/last'} at epoch 1, step {HANG_AT_STEP}" in done.stdout
    assert [p.stat().st_mtime_ns for p in finished] == stamps, "finished work is not redone"
    result = json.loads((work / "result/tiny/lottery.json").read_text())
    expected = [r for r in reference["rows"] if r["mode"] in ("low_magnitude", "random")]
    assert comparable(result["rows"]) == comparable(expected)
    assert result["dense"] == reference["dense"]
    assert not (work / LEVEL / "low_magnitude/level_60/run/last").exists()
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
