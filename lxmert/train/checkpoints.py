"""What a training run keeps on disk and how it is read back: checkpoint manifests, weights that must fit the
model, the RNG states that make a resumed run repeat itself, and the summary of a finished run."""
from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..core import distributed as dist
from ..core.errors import InputError
from ..core.files import file_sha256, load_tensors, read_object, remove_file, tensor_metadata
from ..core.paths import Run

SUMMARY_KEYS = ("history", "final", "best", "best_epoch", "steps")


def is_finished(run: Run) -> bool:
    return run.summary.is_file()


def run_summary(run: Run) -> dict:
    """The summary of a finished run (history, final and best accuracy, best epoch, steps)."""
    return read_object(run.summary, SUMMARY_KEYS, "run summary")


def drop_weights(run: Run, *which: str) -> None:
    """Remove the 'best' and/or 'final' weights of a finished run (its summary stays: the run is still done)."""
    for name in which:
        remove_file(run.weights(name))


def run_seed(seed: int, tag: str) -> int:
    """The RNG seed of a fresh run: from the experiment seed and the run's name, within torch's range."""
    return (seed * 1_000_003 + zlib.crc32(tag.encode())) % 2**63


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def resumed_rng(state: dict, seed: int, tag: str) -> dict:
    """The RNG state a rank resumes with. A checkpoint holds every rank's state ('rngs', by rank); a job with
    another number of ranks resumes each rank that was there with its own state, and a rank that was not
    with a state seeded from (seed, run, rank) (the same global batches go on; dropout then differs from an
    uninterrupted run, as it would with another rank count from the start). Checkpoints written before the
    per-rank states were saved hold rank 0's only."""
    states = state.get("rngs") or [state["rng"]]
    if dist.rank() < len(states):
        return states[dist.rank()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_seed(seed, f"{tag} rank {dist.rank()}"))
        return rng_state()


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def digests(folder: Path) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(folder.iterdir())}


def check_digests(folder: Path) -> None:
    """A checkpoint is published whole, so a mismatch means damage from outside (disk, a hand edit)."""
    manifest = read_object(folder / "manifest.json", ("step", "files"), "checkpoint manifest")
    found = digests(folder)
    found.pop("manifest.json", None)
    if found != manifest["files"]:
        raise InputError(f"{folder}: checkpoint files differ from its manifest (damaged outside this program); "
                         f"remove {folder} to restart the run from its beginning")


def check_best(path: Path, epoch: int) -> None:
    """best/ is written when an epoch beats the best so far, outside the checkpoint. A kill between the two
    re-runs the epoch on resume, which rewrites best/ with the same weights (training is deterministic); if a
    non-deterministic rerun did not (another best epoch, e.g. on a GPU without deterministic kernels), the
    best-on-valid weights of this run are gone: refuse rather than report another epoch's weights."""
    written = (tensor_metadata(path) or {}).get("epoch")
    if written != str(epoch):
        raise InputError(f"{path}: holds the weights of epoch {written}, but the run's best validation epoch is "
                         f"{epoch} (a resumed run that did not repeat itself exactly); remove {path.parent.parent} "
                         "to train it again")


def check_compatible(expected: dict, found: dict, source: Path) -> None:
    """Refuse weights made for another config: name what differs (keys or shapes)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise InputError(f"{source} does not match this config: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {extra[:5]}"
                         f"{'...' if len(extra) > 5 else ''}")
    for k, v in expected.items():
        if tuple(found[k].shape) != tuple(v.shape):
            raise InputError(f"{source} does not match this config: '{k}' has shape {tuple(found[k].shape)}, "
                             f"this config needs {tuple(v.shape)}")


def check_masked(expected: list[str], found: Optional[list[str]], source: Path) -> None:
    """Refuse to resume a masked run with another prunable set (e.g. include_embeddings changed): the
    weights have the same shapes, so only the names of the masked tensors tell."""
    if found is None or list(found) == list(expected):
        return
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    raise InputError(f"{source} was trained with another prunable set than this config: {len(found)} masked "
                     f"tensors there, {len(expected)} here; not masked there: {missing[:5]}"
                     f"{'...' if len(missing) > 5 else ''}, not masked here: {extra[:5]}"
                     f"{'...' if len(extra) > 5 else ''}")


def load_weights(model: nn.Module, weights: Path | dict, source: Optional[Path] = None) -> None:
    """Load a safetensors file, or a state dict already in memory (named by `source` in errors), after checking
    that it fits the model."""
    state = load_tensors(weights) if isinstance(weights, (str, Path)) else weights
    where = Path(weights) if isinstance(weights, (str, Path)) else (source or Path("weights"))
    check_compatible(model.state_dict(), state, where)
    model.load_state_dict(state)
