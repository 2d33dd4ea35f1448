"""Shared fixtures: one tiny embedded benchmark per session and a tiny config that points at it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

# One intra-op thread, also in every process a test forks or starts (configure_workers keeps it): the
# models are tiny, and on 2 shared cores a second OpenMP thread that waits for a busy core made training
# steps up to 100x slower (two forked studies with two threads each ran the crash test ~5x slower).
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

from lxmert.core.config import Config, EmbeddedConfig, load_config
from lxmert.embedded.generator import ensure_embedded

torch.set_num_threads(1)
os.environ["LXMERT_WORKERS"] = "1"  # in-process studies run as one process unless a test asks for workers

# Sizes chosen so that every split is small but all question types still occur, and the training
# split (400) is a multiple of the batch size (32 does not divide it; 40 and 20 do).
TINY_DATA = {"train_questions": 400, "valid_questions": 150, "test_questions": 150,
             "cp_train_questions": 150, "cp_valid_questions": 150, "cp_test_iid_questions": 150,
             "cp_test_questions": 150, "pretrain_images": 60,
             "num_regions": 8, "feat_dim": 16, "min_objects": 2, "max_objects": 5}


def tiny_overrides(root: str | Path, experiment: str = "tiny", epochs: int = 1, batch_size: int = 40,
                   extra: Optional[list[str]] = None) -> list[str]:
    """`key=value` overrides of a tiny, deterministic experiment on the session's dataset."""
    items = [f"experiment={experiment}", "seeds=[0]", f"data.root={root}",
             *(f"data.embedded.{k}={v}" for k, v in TINY_DATA.items()),
             "model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
             "model.l_layers=1", "model.x_layers=1", "model.r_layers=1", "model.dropout=0.0",
             f"train.epochs={epochs}", f"train.batch_size={batch_size}", "train.lr=0.001",
             "train.eval_batch_size=200", "train.warmup=0.1", "blind.epochs=2",
             "lottery.levels=[0.3,0.6]"]
    return items + list(extra or [])


def tiny_config(root: str | Path, **kwargs) -> Config:
    return load_config(None, tiny_overrides(root, **kwargs))


def tiny_yaml(path: Path, root: str | Path, **kwargs) -> Path:
    """The tiny experiment written as a YAML file (for the command line)."""
    import yaml

    cfg = tiny_config(root, **kwargs)
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory) -> Path:
    """The tiny embedded benchmark, generated once for the whole session (read-only for tests)."""
    root = tmp_path_factory.mktemp("data") / "embedded"
    ensure_embedded(EmbeddedConfig(**TINY_DATA), root, log=lambda _: None)
    return root


@pytest.fixture
def tiny_cfg(embedded_root) -> Config:
    return tiny_config(embedded_root)


@pytest.fixture(scope="session")
def tiny_data(embedded_root):
    """The loaded splits of the tiny config (loading is read-only, so tests may share it)."""
    from lxmert.data.datasets import load_data

    return load_data(tiny_config(embedded_root), log=lambda _: None)


@pytest.fixture(autouse=True)
def _reset_run_logging():
    """Runs attach file loggers and a metrics path relative to the working directory: drop them after
    each test so a later test in another directory never appends to them."""
    yield
    from lxmert.core import logs

    logs.close()


LOTTERY_EXTRA = ["lottery.modes=[low_magnitude,random,high_magnitude]", "lottery.levels=[0.3,0.6]",
                 "checkpoints.keep=all"]


@pytest.fixture(scope="session")
def lottery_run(embedded_root, tmp_path_factory):
    """One tiny lottery study (3 modes x 2 levels, 1 epoch each), run in its own working directory.

    Shared by the lottery tests and as the single-process reference of the distributed and
    kill-and-resume tests. Returns (working directory, config, result)."""
    import os

    from lxmert.studies.lottery import run_lottery

    workdir = tmp_path_factory.mktemp("lottery")
    cfg = tiny_config(embedded_root, extra=LOTTERY_EXTRA)
    old = os.getcwd()
    os.chdir(workdir)
    try:
        result = run_lottery(cfg)
    finally:
        os.chdir(old)
    return workdir, cfg, result


REPO = Path(__file__).resolve().parents[1]


def _repository_files() -> set[str]:
    """Every untracked or ignored file of the checkout (caches, the environment and sources being edited aside):
    what a test wrote into the repository (models/, result/, logs/, data/, ...) instead of its temporary folder."""
    import subprocess

    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    skip = ("__pycache__", ".venv/", ".pytest_cache", ".ruff_cache")
    sources = ("lxmert/", "tests/", "bench/", "docs/", "run/")
    return {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!") and not any(s in line for s in skip)
            and not (line[3:].startswith(sources) and line.endswith((".py", ".md", ".yaml", ".bash")))}


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_into_the_repository():
    """The suite writes only into its temporary folders: the checkout is as it was at the end."""
    before = _repository_files()
    yield
    written = sorted(_repository_files() - before)
    assert not written, f"tests wrote into the repository: {written[:10]}"


def cli_env() -> dict:
    """Environment of a `python -m lxmert` subprocess: this checkout importable, one thread, no bars."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", CI="1", TOKENIZERS_PARALLELISM="false", LXMERT_WORKERS="1",
               LXMERT_POLL_SECONDS="0.1")
    return env


def comparable(rows: list[dict]) -> list[dict]:
    """Lottery rows without their wall-clock time and what they ran on (processes, commit)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "environment")} for r in rows]
