"""The project's errors and the one line and exit code each becomes on the command line.

Kept free of torch so that `python -m lxmert check` validates a config in a fraction of a second.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable, Optional


class ConfigError(ValueError):
    """A configuration problem; the message names the file and key."""


class InputError(ValueError):
    """Bad input (file, field or key); the message names it."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class WorkerFailed(RuntimeError):
    """A worker process stopped with an error it has already printed; carries its exit code."""

    def __init__(self, code: int):
        super().__init__(f"a worker process exited with {code}")
        self.code = code


INTERRUPTED = "error: interrupted; run the same command again to resume where it stopped"
# File-system errors that name a path the user gave or a folder a run uses (a read-only or deleted unit
# folder, a file where a folder belongs, a symlink loop), with what to do.
_RERUN = "; fix it and run the same command again (finished work is kept)"
PATH_ERRORS = {errno.EACCES: _RERUN, errno.EPERM: _RERUN, errno.EROFS: _RERUN, errno.ENOENT: _RERUN,
               errno.ENOTDIR: _RERUN, errno.EISDIR: _RERUN, errno.ELOOP: _RERUN, errno.ENAMETOOLONG: _RERUN}


def failure(e: BaseException) -> tuple[int, Optional[str]]:
    """(exit code, the one line to print) for an error of ours: 2 bad input, 3 divergence, 4 full disk,
    130 interrupted; (1, None) for anything else, whose traceback is worth showing."""
    if isinstance(e, (ConfigError, InputError)):
        return 2, f"error: {e}"
    if isinstance(e, TrainingDiverged):
        return 3, f"error: {e}"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return 4, f"error: {e}"
    if isinstance(e, OSError) and e.errno in PATH_ERRORS:  # names the path: a file or folder the run cannot use
        return 2, f"error: {' '.join(str(e).split())}{PATH_ERRORS[e.errno]}"
    if isinstance(e, KeyboardInterrupt):
        return 130, INTERRUPTED
    if isinstance(e, WorkerFailed):
        return e.code, None
    return 1, None


def exit_code(action: Callable[[], object]) -> int:
    """Run a command-line action: 0, or one `error:` line on stderr with the project's exit codes (2 bad
    input, 4 disk full, 130 interrupted; a traceback and 1 for anything else)."""
    try:
        action()
    except BaseException as e:  # noqa: B036 - every error becomes its one line and exit code
        code, line = failure(e)
        if line is not None:
            print(line, file=sys.stderr)
        elif code == 1:
            raise
        return code
    return 0
