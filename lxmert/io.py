"""Crash-safe writing and safe reading.

Every file the project writes goes to a temporary name in the same folder and is renamed into place,
so a reader (or a resumed run) never sees half a file. Nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file


_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """Bad input (file, field or key); the message names it."""


def exit_code(action: Callable[[], object]) -> int:
    """Run a command-line action: 0, or one `error:` line on stderr and 2 for bad input."""
    try:
        action()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# The temporaries of atomic_path / atomic_folder: '.<name>.<8 random characters of mkstemp>.tmp', and the
# '.old' folder that briefly holds a replaced folder. Only names of this form are ever cleaned up.
_TEMPORARY = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.(?:tmp|old)$")


def _is_temporary(name: str, of: Optional[str] = None) -> bool:
    match = _TEMPORARY.match(name)
    return bool(match) and (of is None or match.group(1) == of)


def _no_space(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a full disk. torch.save reports it as a RuntimeError
    raised while handling the OSError, safetensors as its own error whose text ends in '(os error 28)'."""
    seen: set[int] = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if f"(os error {errno.ENOSPC})" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full(path: Path) -> OSError:
    return OSError(errno.ENOSPC, f"no space left on device while writing {path}; {path.name} was left as it was")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, else remove it.

    A full disk, wherever it happens (creating, writing, syncing), becomes one OSError(ENOSPC) naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if _no_space(e):
            raise _disk_full(path) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if _no_space(e):
            raise _disk_full(path) from None
        raise


def remove_temporaries(folder: str | Path, of: Optional[str] = None) -> list[Path]:
    """Delete the temporaries a killed writer left under `folder` (a SIGKILL skips every cleanup), or,
    with `of`, only those of the file or folder `folder/of`. Returns what was removed.

    Call it when a run starts or resumes, from the one process that writes there, before anything is
    written. Only names of the project's own temporary pattern are touched."""
    folder = Path(folder)
    removed = []
    for parent, dirs, files in os.walk(folder):
        for name in [d for d in dirs if _is_temporary(d, of)]:
            dirs.remove(name)
            shutil.rmtree(Path(parent) / name, ignore_errors=True)
            removed.append(Path(parent) / name)
        for name in [f for f in files if _is_temporary(f, of)]:
            (Path(parent) / name).unlink(missing_ok=True)
            removed.append(Path(parent) / name)
        if of is not None:
            break
    return sorted(removed)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read JSON; a missing, truncated or malformed file is one clear error naming it."""
    path = Path(path)
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"weights not found: {path}")
    return load_file(str(path), device=device)


def save_state(path: str | Path, state: dict) -> None:
    """Save a training state (tensors, numbers, strings, containers only) for weights_only loading."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_state(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write `path` with a function that writes to the temporary path it is given."""
    with atomic_path(path) as tmp:
        writer(tmp)


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    """Stop before any work when an output folder exists and may not be replaced."""
    if Path(path).exists() and not overwrite:
        raise InputError(f"{path} already exists; remove it or pass --overwrite")


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success it replaces `path`, on any error it
    is deleted, so readers only ever see a complete folder (a store is many files written for hours)."""
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            raise _disk_full(path) from None
        raise
