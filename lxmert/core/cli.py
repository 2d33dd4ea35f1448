"""What the command-line tools (`python -m lxmert score | prepare | convert`) share: a usage error is one
`error:` line with exit code 2, and an output path that cannot be written is refused before any work.

argparse prints its whole usage block above the error; the project promises one line on stderr naming
what is wrong (lxmert.core.errors). `--help` is unchanged. Kept free of torch, like core.errors.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NoReturn

from .errors import InputError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors (unknown option, missing or malformed value) are one line on
    stderr, `error: <message> (see <prog> --help)`, and exit code 2. Its sub-parsers are Parsers too
    (add_subparsers makes them of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def check_output(path: str | Path, folder: bool, option: str = "--out") -> Path:
    """Refuse an output that cannot be written where it is asked for, before any work: a folder where a
    file is to go (or a file where a folder is to go), a file on the way to it, a folder not writable.
    Whether an existing output may be replaced is for the caller to say."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise InputError(f"{option} {path}: is a folder; give the name of the file to write")
    if path.exists() and not path.is_dir() and folder:
        raise InputError(f"{option} {path}: is a file, not a folder; give a folder to write into")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"{option} {path}: folder {parent} is not writable")
            break
    return path
