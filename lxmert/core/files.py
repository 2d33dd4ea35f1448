"""Crash-safe writing and safe reading.

Every file the project writes goes to a temporary name in the same folder and is renamed into place,
so a reader (or a resumed run) never sees half a file. Nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import InputError

UMASK = os.umask(0)
os.umask(UMASK)


# Every temporary the project writes is named '.<name>.lxmert-<pid>-<random>.tmp' (a file or folder being
# written) or '.<name>.lxmert-<pid>-<random>.old' (a folder on its way out). Only names of this form are
# ever cleaned up, so a user's own '.x.abcdefgh.tmp' is never touched; the pid says which process left it.
_TEMPORARY = re.compile(r"^\.(.+)\.lxmert-(\d+)-[a-z0-9_]{6,}\.(?:tmp|old)$")


def _is_temporary(name: str, of: Optional[str] = None) -> bool:
    match = _TEMPORARY.match(name)
    return bool(match) and (of is None or match.group(1) == of)


def _temporary_prefix(name: str) -> str:
    return f".{name}.lxmert-{os.getpid()}-"


# -- fault injection --------------------------------------------------------------------------------
# LXMERT_FAULT_AT=N kills the process (os._exit(137), like a SIGKILL: no cleanup runs) just before its Nth
# file-system change: every rename that publishes a file or folder, and every removal. A kill anywhere
# else leaves the disk as one of these points does, so walking N over all of them tests every crash.
# LXMERT_FAULT_TRACE=FILE appends one line per point ("<n> <kind> <path>") to count and name them.
# LXMERT_FAULT_ON=TEXT dies just before the first change whose path contains TEXT (e.g. "/final": after the
# last checkpoint of a run, before the run is published).
_FAULTS = {"count": 0}


def fault_point(kind: str, path: str | Path) -> None:
    """Count one file-system change; die here when LXMERT_FAULT_AT or LXMERT_FAULT_ON says so. Changes inside
    a temporary folder are not counted: nothing reads them until the folder itself is published."""
    at, on, trace = (os.environ.get(k) for k in ("LXMERT_FAULT_AT", "LXMERT_FAULT_ON", "LXMERT_FAULT_TRACE"))
    if not (at or on or trace) or _is_temporary(Path(path).parent.name):
        return
    _FAULTS["count"] += 1
    n = _FAULTS["count"]
    if trace:
        with open(trace, "a") as fh:
            fh.write(f"{n} {kind} {path}\n")
    if at and n == int(at) or on and on in str(path):
        os._exit(137)


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


def _publish(tmp: Path, path: Path) -> None:
    """The one rename that makes a finished temporary visible under its name."""
    fault_point("rename", path)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, else remove it.

    A full disk, wherever it happens (creating, writing, syncing), becomes one OSError(ENOSPC) naming `path`."""
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        if _no_space(e):
            raise _disk_full(path) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # after the writer: some writers (safetensors) replace the file they are given with a 0600 one
        os.chmod(tmp_path, 0o666 & ~UMASK)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        _publish(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if _no_space(e):
            raise _disk_full(path) from None
        raise


def make_folder(path: str | Path) -> Path:
    """mkdir -p with the permissions the umask allows."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_temporaries(folder: str | Path, of: Optional[str] = None, recursive: bool = True) -> list[Path]:
    """Delete the temporaries a killed writer left under `folder` (a SIGKILL skips every cleanup), or,
    with `of`, only those of the file or folder `folder/of` (directly in `folder`). Returns what was removed.

    Call it only while no other process can be writing there: under the lock of the unit of work that
    owns `folder` (core.scheduler), or from the one process that writes there. Only names of the project's
    own temporary pattern are touched."""
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
        if of is not None or not recursive:
            break
    return sorted(removed)


def remove_tree(path: str | Path) -> None:
    """Remove a folder so that no reader ever sees it half-deleted: it is first renamed to a temporary
    name (one atomic step), then deleted; a kill in between leaves a temporary that cleanup removes."""
    path = Path(path)
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path.name), suffix=".old", dir=path.parent))
    fault_point("remove", path)
    os.replace(path, trash / path.name)
    shutil.rmtree(trash)


def remove_file(path: str | Path) -> None:
    """Remove one file (one atomic step: a reader sees it whole or not at all); nothing when it is gone."""
    path = Path(path)
    if path.exists():
        fault_point("remove", path)
        path.unlink(missing_ok=True)  # another process may have removed it since


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 16 MB chunks (never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read JSON; a missing, truncated, binary or malformed file is one clear error naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); is it the right file?") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def read_object(path: str | Path, required: tuple[str, ...], what: str = "JSON file") -> dict:
    """A JSON object with the given keys (a result or summary file the project wrote): anything else is one
    clear error naming the file and the first missing key."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}; remove it to recompute")
    missing = [k for k in required if k not in data]
    if missing:
        raise InputError(f"{path}: field '{missing[0]}' is missing (not a complete {what}); remove it to recompute")
    return data


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"weights not found: {path}")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise InputError(f"{path}: unreadable weights file, truncated or corrupt ({str(e).splitlines()[0]}); "
                         f"remove it (or the run folder holding it) to recompute") from None


def tensor_metadata(path: str | Path) -> Optional[dict[str, str]]:
    """The string metadata of a safetensors file ({} when it has none), None when the file is missing or
    unreadable (load_tensors gives the clear error for those)."""
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None


def save_state(path: str | Path, state: dict) -> None:
    """Save a training state (tensors, numbers, strings, containers only) for weights_only loading."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_state(path: str | Path) -> dict:
    """A training state saved by save_state. Only tensors and plain data are ever unpickled; anything else
    is refused (never retried with weights_only=False)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"training state not found: {path}") from None
    except Exception as e:  # truncated zip, foreign pickle, ...: torch's own text suggests unsafe loading
        raise InputError(f"{path}: not a training state this project wrote, or truncated ({type(e).__name__}); "
                         f"remove the checkpoint folder holding it to restart that run") from None


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
    make_folder(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path.name), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~UMASK)
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            remove_tree(path)
        _publish(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            raise _disk_full(path) from None
        raise


def _fsync_tree(folder: Path) -> None:
    """Flush every file of a folder before it is published: after a power cut the rename must not point
    at empty files. Every file and folder gets the permissions the umask allows (writers such as
    safetensors, inside save_pretrained, make 0600 files whatever the umask)."""
    for parent, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(Path(parent) / name, 0o777 & ~UMASK)
        for name in files:
            os.chmod(Path(parent) / name, 0o666 & ~UMASK)
            fd = os.open(Path(parent) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
