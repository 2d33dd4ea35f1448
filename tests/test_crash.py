"""Kill anywhere, rerun, get bit-identical results: fault injection at every file-system change.

A tiny lottery study (dense fine-tune with mid-epoch checkpoints, two iterative levels) is run once
uninterrupted, with LXMERT_FAULT_TRACE listing its file-system changes (every rename that publishes a
file or folder, every removal). Then, for every N, a process is killed (os._exit(137): no cleanup, like
SIGKILL) just before its Nth change and the study is rerun to the end. Every resumed study must write the
same lottery.json (wall-clock times aside) and bit-identical weights, masks and predictions, and leave no
temporary and no checkpoint behind.

The processes are forks of the test process (which has imported torch and transformers once), so each
costs the study's work only; two run at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import traceback
from pathlib import Path

import pytest
from conftest import tiny_yaml

STUDY = ["lottery.modes=[random]", "lottery.levels=[0.3,0.6]", "train.save_every_steps=3", "blind.epochs=1",
         "train.batch_size=80"]  # 5 steps an epoch: checkpoints at steps 3, 5 (epoch end), 8, then final
WORKERS = 2


def _fork(work: Path, config: Path, env: dict) -> int:
    """Run the study in a forked process in `work`; its exit code (137 when killed by the fault)."""
    return _wait(_start(work, config, env))


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _start(work: Path, config: Path, env: dict, command: str = "lottery") -> int:
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 98
        try:
            os.chdir(work)
            os.environ.update(env)
            from lxmert.__main__ import main

            code = main([command, "--config", str(config)])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _outputs(work: Path) -> dict[str, str]:
    """Digest of every result file; lottery.json and finetune.json without wall-clock seconds."""
    out = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        rel = str(path.relative_to(work))
        if rel.startswith("logs/") or path.name in (".lock",) or path.name.endswith(".lock"):
            continue
        if path.suffix == ".png":
            continue  # plots are drawn from the JSON compared here
        data = path.read_bytes()
        if path.name in ("lottery.json", "finetune.json", "result.json", "summary.json"):
            data = json.dumps(_without_seconds(json.loads(data)), sort_keys=True).encode()
        if path.name == "lottery.csv":
            lines = [line.split(b",") for line in data.splitlines()]
            at = lines[0].index(b"seconds")
            data = b"\n".join(b",".join(cells[:at] + cells[at + 1:]) for cells in lines)
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _without_seconds(tree):
    if isinstance(tree, dict):
        return {k: _without_seconds(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [_without_seconds(v) for v in tree]
    return tree


@pytest.fixture(scope="module")
def reference(embedded_root, tmp_path_factory):
    from transformers import LxmertModel  # noqa: F401

    import lxmert.studies.lottery  # noqa: F401  (imported once here, not in every fork)

    base = tmp_path_factory.mktemp("crash")
    config = tiny_yaml(base / "tiny.yaml", embedded_root, epochs=2, extra=STUDY)
    work = base / "reference"
    work.mkdir()
    trace = base / "trace.txt"
    assert _fork(work, config, {"LXMERT_FAULT_TRACE": str(trace)}) == 0
    points = trace.read_text().splitlines()
    return base, config, _outputs(work), points


def test_reference_run_has_every_kind_of_change(reference):
    _, _, outputs, points = reference
    kinds = {line.split()[1] for line in points}
    assert kinds == {"rename", "remove"}
    assert any("/ckpt-" in line for line in points), "mid-run checkpoints are among the points"
    assert any(line.endswith("result/tiny/lottery.json") for line in points)
    assert not any("ckpt-" in name for name in outputs), "no checkpoint is left when the study is done"


def _kill_then_resume(base: Path, config: Path, n: int) -> int:
    """A process that kills the study at point n and then resumes it (in a fork of its own): 0 if both
    behaved (137, then 0), else 1 (the details are checked by the caller from the files)."""
    pid = os.fork()
    if pid == 0:
        work = base / f"kill_{n}"
        work.mkdir()
        ok = _fork(work, config, {"LXMERT_FAULT_AT": str(n)}) == 137 and _fork(work, config, {}) == 0
        os._exit(0 if ok else 1)
    return pid


def test_killed_anywhere_resumes_to_identical_results(reference):
    base, config, expected, points = reference
    failures: list[str] = []
    todo = list(range(1, len(points) + 1))
    while todo:
        batch, todo = todo[:WORKERS], todo[WORKERS:]
        pids = [_kill_then_resume(base, config, n) for n in batch]
        for n, pid in zip(batch, pids):
            _check(base / f"kill_{n}", _wait(pid), points[n - 1], expected, failures)
    assert not failures, "\n".join(failures)


def _check(work: Path, code: int, point: str, expected: dict, failures: list[str]) -> None:
    assert code == 0, f"kill at {point}: the killed run or its resume did not behave (see the output above)"
    got = _outputs(work)
    if got != expected:
        differ = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        failures.append(f"kill at {point}: {differ[:4]}")
    temporaries = [p for p in work.rglob("*") if ".lxmert-" in p.name]
    assert not temporaries, f"kill at {point} left {temporaries}"
    shutil.rmtree(work)


# -- the stand-in pretraining ----------------------------------------------------------------------------

PRETRAIN = ["pretrain.epochs=3", "pretrain.batch_size=16"]  # checkpoints after epochs 1 and 2, then the export


def _pretrain_fork(work: Path, config: Path, env: dict) -> int:
    return _wait(_start(work, config, env, command="pretrain"))


def _export_digest(work: Path) -> dict[str, str]:
    """Digest of every file of the exported stand-in; its record without wall-clock seconds."""
    out = {}
    for path in sorted((work / "standin").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "pretrain.json":
                data = json.dumps(_without_seconds(json.loads(data)), sort_keys=True).encode()
            out[str(path.relative_to(work))] = hashlib.sha256(data).hexdigest()
    return out


def test_killed_pretraining_resumes_to_the_same_stand_in(embedded_root, tmp_path):
    """The stand-in pretraining killed at each of its file-system changes (epoch checkpoints, their removal,
    the export, the checkpoints' removal) and run again ends with the same encoder, head and record as an
    uninterrupted run, and leaves no checkpoint or temporary behind."""
    config = tiny_yaml(tmp_path / "pretrain.yaml", embedded_root,
                       extra=PRETRAIN + ["pretrain.export=standin", "model.pretrained=standin"])
    reference = tmp_path / "reference"
    reference.mkdir()
    trace = tmp_path / "trace.txt"
    assert _pretrain_fork(reference, config, {"LXMERT_FAULT_TRACE": str(trace)}) == 0
    expected, points = _export_digest(reference), trace.read_text().splitlines()
    assert any("standin.run/ckpt-" in p and " rename " in p for p in points), points
    assert sum(p.split()[1] == "remove" for p in points) >= 2, "older checkpoints and the run folder are removed"
    for n in range(1, len(points) + 1):
        work = tmp_path / f"kill_{n}"
        work.mkdir()
        assert _pretrain_fork(work, config, {"LXMERT_FAULT_AT": str(n)}) == 137, points[n - 1]
        assert _pretrain_fork(work, config, {}) == 0, points[n - 1]
        assert _export_digest(work) == expected, f"kill at {points[n - 1]}"
        left = [p for p in work.rglob("*") if ".lxmert-" in p.name or p.name == "standin.run"]
        assert not left, f"kill at {points[n - 1]} left {left}"
        shutil.rmtree(work)
