"""The unit scheduler: how one study is shared by one process, several processes, or a cluster job array.

A study is an ordered list of units (the dense fine-tune of a seed, the pruning levels of a (seed, mode),
one study-B setting ...). A unit has a folder under models/<experiment>/, the units it needs finished
first, the settings that decide what it computes, and a `work` function that does what is missing
(every step of it is skipped when its output is on disk, so work is also how a killed unit resumes).

`run_units` takes the units in order. A unit is taken under an exclusive lock on `<folder>/.lock`
(locks.FileLock: released when its holder exits or dies), so processes started on the same experiment
never run the same unit: each takes a unit the others do not hold, waits while the only units left
are held by others or need units still running elsewhere, and returns when nothing is left for it.
Temporaries inside a unit's folder are removed only by the holder of its lock, so a process never
deletes what a live process is writing.

Settings: every unit records the settings it computes with in `<folder>/settings.json` when it is
first taken. Before any work starts, every unit of the study that has such a record is compared with
the current config; a change stops the run with one line listing the changed keys. Keys that only add
units (seeds, modes, levels, losses, test splits) are not part of any unit's settings: they extend the
grid. Under torchrun, rank 0 takes the locks and chooses; every rank runs the chosen unit.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import distributed as dist
from .errors import InputError, WorkerFailed, failure
from .files import read_json, remove_temporaries, write_json
from .locks import FileLock
from .logs import set_log_prefix
from .paths import LOCK, SETTINGS
from .settings import setting_changes

log = logging.getLogger("lxmert")



def only_units() -> Optional[list[str]]:
    """LXMERT_ONLY (python -m lxmert --only): glob patterns of the units this process may take (a phase of a
    grid: the dense units first, then the rest); None: every unit."""
    value = os.environ.get("LXMERT_ONLY", "").strip()
    return [p.strip() for p in value.split(",") if p.strip()] or None if value else None


def poll_seconds() -> float:
    """How often a waiting process looks again: LXMERT_POLL_SECONDS, 1 s by default."""
    value = os.environ.get("LXMERT_POLL_SECONDS", "1.0")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise InputError(f"LXMERT_POLL_SECONDS={value!r}: give a number of seconds in (0, 3600]")
    return seconds


@dataclass
class Unit:
    name: str                                   # its folder relative to models/<experiment>, e.g. seed_0/dense
    folder: Path
    work: Callable[[], Any]
    finished: Callable[[], bool]
    settings: dict
    needs: tuple[str, ...] = ()                 # names of units that must be finished first
    check: Optional[Callable[[], None]] = None  # extra consistency check before any work (e.g. level chains)
    cleanup: tuple[Path, ...] = field(default=())  # other folders only this unit writes (predictions)
    release: Optional[Callable[[], None]] = None  # drop what a finished unit no longer needs (idempotent)


def check_settings(unit: Unit, experiment: str) -> None:
    """Refuse a unit whose recorded settings differ from the current ones, naming every changed key."""
    path = unit.folder / SETTINGS
    if not path.exists():
        return
    recorded = read_json(path, "unit settings")
    if not isinstance(recorded, dict):
        raise InputError(f"{path}: expected a JSON object of settings; remove {unit.folder} to recompute the unit")
    diffs = setting_changes(recorded, unit.settings, shown=6)
    if diffs:
        raise InputError(f"{path}: experiment '{experiment}' ran {unit.name} with other settings ({diffs}); to run "
                         f"these settings start a new experiment (experiment=NEW_NAME), or remove {unit.folder} to "
                         "recompute that unit")


def preflight(units: list[Unit], experiment: str) -> None:
    """Every check that needs no lock, before any work: names are unique, needs exist, settings match."""
    names = {u.name for u in units}
    if len(names) != len(units):
        raise InputError(f"experiment '{experiment}': two units share a folder name; check the grid keys")
    for u in units:
        missing = [n for n in u.needs if n not in names]
        if missing:
            raise RuntimeError(f"unit {u.name} needs unknown units {missing}")
        check_settings(u, experiment)
        if u.check is not None:
            u.check()


def _take(unit: Unit, experiment: str) -> Optional[FileLock]:
    """The unit's lock if free and the unit still unfinished; its folder cleaned and settings recorded."""
    lock = FileLock(unit.folder / LOCK)
    if not lock.acquire(blocking=False):
        return None
    try:
        if unit.finished():
            lock.release()
            return None
        check_settings(unit, experiment)  # another process may have started it in between
        for folder in (unit.folder, *unit.cleanup):
            for path in remove_temporaries(folder):
                log.info("%s: removed %s, left by an interrupted write", unit.name, path)
        if not (unit.folder / SETTINGS).exists():
            write_json(unit.folder / SETTINGS, unit.settings)
    except BaseException:
        lock.release()
        raise
    return lock


def _held(unit: Unit) -> bool:
    lock = FileLock(unit.folder / LOCK)
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def _choose(units: list[Unit], done: set[str], experiment: str) -> tuple[str, Optional[Unit], Optional[FileLock]]:
    """('run', unit, lock): the first free unfinished unit whose needs are finished. Otherwise 'done' when
    every unit is finished, 'wait' when a unit left needs units still running (it can be taken later),
    and 'end' when every unit left is held by another process (that process writes the tables)."""
    pending = []
    mine = only_units()
    for u in units:
        if u.name in done:
            continue
        if u.finished():
            done.add(u.name)
        elif mine is None or any(fnmatch.fnmatchcase(u.name, p) for p in mine):
            pending.append(u)
    must_wait = False
    for u in pending:
        if any(n not in done for n in u.needs):
            must_wait = True
            continue
        lock = _take(u, experiment)
        if lock is not None:
            return "run", u, lock
        if u.finished():  # finished by another process just now: look again at once
            return "again", None, None
    if not pending:
        return "done", None, None
    return ("wait" if must_wait else "end"), None, None


def run_units(units: list[Unit], experiment: str, poll: Optional[float] = None) -> bool:
    """Do every unit this process (and its workers) can take; True when all units of the list are finished.

    With several workers (LXMERT_WORKERS, see configure_workers) the process forks them here, after
    its data is loaded: each runs the same loop, and this returns once all of them have stopped."""
    poll = poll_seconds() if poll is None else poll
    preflight(units, experiment)
    workers = 1 if dist.active() else worker_count()
    children = [_fork_worker(units, experiment, poll, i) for i in range(1, workers)]
    try:
        _loop(units, experiment, poll)
    except BaseException:
        for pid in children:  # their units resume on the next run, like any interrupted unit
            os.kill(pid, signal.SIGTERM)
        _wait_all(children)
        raise
    codes = _wait_all(children)
    failed = [c for c in codes if c != 0]
    if failed:
        raise WorkerFailed(failed[0])
    finished = all(u.finished() for u in units)
    if finished and dist.is_main():  # a kill between a unit's result and its release left files behind
        for u in units:
            if u.release is not None:
                u.release()
    return finished


def _fork_worker(units: list[Unit], experiment: str, poll: float, index: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:  # the worker never returns into the caller: it runs the loop and exits
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        set_log_prefix(f"[worker {index}] ")
        _loop(units, experiment, poll)
    except BaseException as e:  # noqa: B036 - reported as its one line, like the main process does
        code, line = failure(e)
        if line is not None and code != 130:  # an interrupt is reported once, by the main process
            print(line, file=sys.stderr)
        elif code == 1:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait_all(pids: list[int]) -> list[int]:
    codes = []
    for pid in pids:
        while True:
            try:
                codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
                break
            except InterruptedError:
                continue
    return codes


def _loop(units: list[Unit], experiment: str, poll: float) -> bool:
    done: set[str] = set()
    waited_for: Optional[str] = None
    while True:
        decision, unit, lock = _choose(units, done, experiment) if dist.is_main() else ("", None, None)
        decision, name = dist.broadcast((decision, unit.name if unit is not None else None))
        if decision == "run":
            unit = unit if dist.is_main() else next(u for u in units if u.name == name)
            try:
                unit.work()
                if unit.release is not None and dist.is_main():
                    unit.release()
            finally:
                if lock is not None:
                    lock.release()
            dist.barrier()
            waited_for = None
            continue
        if decision == "done":
            return True
        if decision == "again":
            continue
        if decision == "end":
            log.info("the units left are running in other processes; the last of them writes the tables")
            return False
        if dist.is_main():
            blocked = [u.name for u in units if u.name not in done and not u.finished()]
            if blocked and blocked[0] != waited_for:
                waited_for = blocked[0]
                log.info("waiting for units held by other processes (%s%s)", ", ".join(blocked[:3]),
                         ", ..." if len(blocked) > 3 else "")
        time.sleep(poll)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_count() -> int:
    """LXMERT_WORKERS, else one worker per core on a machine without CUDA, else 1."""
    value = os.environ.get("LXMERT_WORKERS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise InputError(f"LXMERT_WORKERS={value!r}: give a positive number of worker processes")
        return int(value)
    return 1 if torch.cuda.is_available() or "RANK" in os.environ else cpu_cores()


def configure_workers(study: bool) -> None:
    """Intra-op threads of this process: on CPU the cores divided among the workers (one thread each by
    default) unless OMP_NUM_THREADS says otherwise. Tokenizers must not use threads across the fork."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    workers = worker_count() if study else 1
    torch.set_num_threads(max(1, cpu_cores() // workers))


def once(folder: Path, finished: Callable[[], bool], make: Callable[[], Any], of: Optional[str] = None) -> None:
    """Make an output that several units need (a seed's initial weights, a question-only baseline) exactly
    once: under its own blocking lock, skipped when already there. Only rank 0 makes it; every rank
    returns after it exists. `of` limits the cleanup of temporaries to that name inside `folder`."""
    if dist.is_main() and not finished():
        with FileLock(folder / (f".{of}.lock" if of else LOCK)):
            if not finished():
                remove_temporaries(folder, of=of)
                make()
    dist.barrier()
