"""What a run ran on, recorded beside its numbers (torch build, device, GPUs, precision, CPU, commit), and the
refusal of a study on real data that would train on the CPU without being asked to.

A CPU build of torch on a GPU machine trains on the CPU without a word (a login node without nvidia-smi gets
the CPU wheel from run/setup.bash, and the GPU node then accepts it); so a study on prepared data needs CUDA
unless the config says `device: cpu`.
"""
from __future__ import annotations

import functools
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from . import distributed as dist
from .config import Config
from .errors import InputError

CUDA_WHEEL = ("pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128, "
              "or the index of your CUDA version from https://pytorch.org/get-started/locally/")


def nvidia_gpus() -> list[str]:
    """GPU names nvidia-smi lists (empty when it is missing or fails): what the machine has, whatever torch sees."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def check_device(cfg: Config) -> None:
    """Refuse, before any work, a device choice the machine cannot honour, and a study on real data that
    would silently train on the CPU."""
    dist.use(cfg.device)
    if torch.cuda.is_available() or cfg.device == "cpu":
        return
    if cfg.device == "auto" and cfg.data.dataset != "prepared":
        return  # the embedded benchmark runs anywhere
    gpus = nvidia_gpus()
    why = (f"nvidia-smi sees {len(gpus)} GPU(s) ({gpus[0]}) but torch {torch.__version__} cannot use them "
           f"({'a CPU build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda + ' does not start'})"
           if gpus else f"torch {torch.__version__} sees no GPU")
    what = "device: cuda" if cfg.device == "cuda" else "a study on real data (data.dataset: prepared)"
    raise InputError(f"{what} would train on the CPU: {why}; install the CUDA build ({CUDA_WHEEL}) or set "
                     "device=cpu to run on the CPU anyway")


@functools.lru_cache(maxsize=1)
def _commit() -> Optional[str]:
    """The commit of this checkout (with '+changes' when the tree differs from it), None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=20)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one): numbers are bit-identical only on one CPU type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(cfg: Config) -> dict:
    """The environment record of a run: software, device, GPUs, the precision actually used, CPU, commit."""
    cuda = dist.cuda()
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": str(dist.device().type),
            "gpus": torch.cuda.device_count() if cuda else 0,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "precision": cfg.train.precision if cuda else "fp32", "world_size": dist.world(),
            "cpu": cpu_name(), "python": platform.python_version(), "commit": _commit()}


def summary(record: dict) -> str:
    """The record in one log line."""
    where = f"{record['gpus']} x {record['gpu']}" if record["gpus"] else f"CPU ({record['cpu']})"
    return (f"torch {record['torch']} ({'CUDA ' + record['torch_cuda'] if record['torch_cuda'] else 'CPU build'}), "
            f"running on {where}, {record['precision']}, {record['world_size']} process(es), "
            f"commit {record['commit'] or 'unknown'}")
