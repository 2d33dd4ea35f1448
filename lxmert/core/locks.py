"""Locks between the processes that share an experiment's folders, on one machine or on many nodes.

A `FileLock(path)` is two locks, both needed to hold it:

- an flock on `path` (e.g. `<unit>/.lock`): fast, it orders the processes of one machine (a waiter sleeps
  in the kernel), and the kernel releases it when its holder exits or is killed. On some shared file
  systems it does not reach other nodes (Lustre mounted with `localflock`, BeeGFS by default);
- a lease, the file `<name>.lease.lock` next to it (`.lock` -> `.lease.lock`, `.tables.lock` ->
  `.tables.lease.lock`), created with O_CREAT | O_EXCL (atomic on local file systems, NFSv3+, Lustre and
  BeeGFS: of two nodes that create it at once, one succeeds). It holds a JSON record {host, boot, pid,
  pid_start, token, seconds, started}; its holder keeps it alive with a heartbeat, a daemon thread that sets
  its modification time every LEASE_SECONDS / 4. This is what holds across nodes.

Acquire takes the flock (blocking or not), then creates the lease. When a lease is there already:

- it is **stale** when it names this machine (same host name and boot id) and a process that is gone (no
  such pid, a zombie, or a pid now reused by a process started at another time), or when its heartbeat is
  older than LEASE_SECONDS (any machine; the holder's own LEASE_SECONDS, recorded in the lease, when that
  is longer, so processes started with other values never cut a holder short). A lease without a readable
  record (its creator has not written it yet, or died before it did) has no time to trust (NFSv3 keeps a
  verifier in a new file's times until its creator sets them): it is stale once this process has seen it
  unchanged for LEASE_SECONDS. A stale lease is taken over, else the lock is taken:
  `acquire(blocking=False)` returns False (and gives back the flock), `acquire()` looks again every 0.2 s,
  then every second at most, holding the flock meanwhile;
- a take-over first creates `<name>.lease.claim-<token of the stale lease>.lock` (O_EXCL: of the processes
  that saw the same stale lease, one goes on), checks that the lease is still the one judged stale, removes
  it and creates its own with O_EXCL, so the lease's name is never replaced behind a live holder's back and
  a process that arrives between the removal and the creation wins in its place: never two holders. A claim
  left by a process killed in that window is stale by the same rule and removed the same way.

So when a holder dies on this machine, the flock is free at once and its lease is taken over at once (its
pid is gone), as with flock alone; when it dies on another node, its lease is taken over LEASE_SECONDS
after its last heartbeat (a node that rebooted counts as another machine: its boot id changed). Release
stops the heartbeat, removes the lease only if it still holds this lock's token (never another holder's),
then unlocks the flock.

LEASE_SECONDS: the environment variable LXMERT_LEASE_SECONDS, a number of seconds in [1, 86400], 300 by
default. Shorter means a unit of a crashed node is taken over sooner; it must stay well above the longest
stall of a live holder (a heartbeat delayed by more than LEASE_SECONDS, e.g. a process stopped with SIGSTOP
or a file system that hangs that long, lets another node take the lease while the holder still runs; the
holder's heartbeat then notices and logs it, and its release leaves the other's lease alone).

Clocks: a lease's age is measured with the file system's clock, not this node's. The heartbeat sets the
lease's time to "now" (utime without a time: NFS stamps it with the server's clock), and the reader stamps
its own lock file the same way and reads it back, so the two times come from the same clock where the file
system stamps them; where each client stamps them with its own clock (as Lustre and BeeGFS clients may),
the clocks of the nodes must agree to well within LEASE_SECONDS / 2 (NTP keeps them within milliseconds). A lease is read through a fresh open, which
refreshes NFS's cached attributes (close-to-open).

Forks: the scheduler forks its workers before they take locks. A lock held across a fork stays the parent's:
the heartbeat thread does not survive in the child, and in the child `release()` only closes its copy of
the descriptor (the flock is shared by both copies and stays held; the lease stays) and `acquire()` takes
the lock anew, like any other process would.

Lease and claim files end in `.lock`, like the lock files themselves: they are infrastructure, never
outputs, and no fault points are counted for them (core.files).
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import InputError
from .files import UMASK, make_folder

log = logging.getLogger("lxmert")

LEASE_VARIABLE = "LXMERT_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 300.0
_TOKEN = re.compile(r"^[0-9a-f]{8,64}$")
_FIRST_POLL, _LAST_POLL = 0.2, 1.0  # a blocking acquire looks again after 0.2 s, then every second at most


def lease_seconds() -> float:
    """How long a lease lives without a heartbeat: LXMERT_LEASE_SECONDS, 300 s by default."""
    value = os.environ.get(LEASE_VARIABLE, str(DEFAULT_LEASE_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 1 <= seconds <= 86400:  # also refuses nan
        raise InputError(f"{LEASE_VARIABLE}={value!r}: give a number of seconds in [1, 86400] (how long a lock's "
                         "lease lives without a heartbeat; 300 by default)")
    return seconds


def lease_path(path: str | Path) -> Path:
    """The lease file of the lock file `path`: `.lock` -> `.lease.lock`, `.x.lock` -> `.x.lease.lock`."""
    prefix = _prefix(Path(path))
    return prefix.with_name(prefix.name + ".lock")


def _prefix(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".lock") + ".lease")


# -- who holds a lease ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _boot_id() -> Optional[str]:
    """This machine's boot id (Linux; None elsewhere): it changes when the machine restarts."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _this_machine() -> tuple[str, Optional[str]]:
    """(host name, boot id): a lease that names both was made on this machine since it last started."""
    return socket.gethostname(), _boot_id()


def _process(pid: int) -> Optional[tuple[str, str]]:
    """(state, start time in clock ticks after boot) of a process from /proc, None where not readable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: Optional[str]) -> bool:
    """Whether process `pid` of this machine still runs and is the one that started at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    state = _process(pid)
    if state is None:
        return True
    return state[0] not in ("Z", "X", "x") and (started is None or state[1] == started)


def _record(seconds: float) -> dict:
    host, boot = _this_machine()
    own = _process(os.getpid())
    return {"host": host, "boot": boot, "pid": os.getpid(), "pid_start": own[1] if own else None,
            "token": secrets.token_hex(16), "seconds": seconds, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@dataclass
class _Held:
    identity: str           # the record's token; for a file without a readable record, its inode and size
    record: Optional[dict]  # None while its creator is still writing it, or when it died before writing it
    mtime: float            # the last heartbeat


def _read(path: Path) -> Optional[_Held]:
    """The lease (or claim) at `path`, None when there is none. A fresh open refreshes NFS's attributes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("token"), str) or not _TOKEN.match(record["token"]):
        return _Held(f"x{st.st_ino}-{st.st_size}", None, st.st_mtime)
    return _Held(record["token"], record, st.st_mtime)


def _create(path: Path, record: dict) -> None:
    """Create `path` holding `record`; FileExistsError when it exists (O_EXCL: one creator wins)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~UMASK)
    try:
        data = json.dumps(record).encode()
        while data:
            data = data[os.write(fd, data):]
    except BaseException:
        os.close(fd)
        _remove(path)
        raise
    os.close(fd)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _file_system_now(fd: int) -> float:
    """The file system's "now": stamp the (held) lock file with the current time and read it back, so a
    lease's heartbeat and this moment come from the same clock where the file system stamps times."""
    try:
        os.utime(fd)
        return os.fstat(fd).st_mtime
    except OSError:
        return time.time()


# (file, identity) -> when this process first saw it without a readable record (time.monotonic)
_UNREADABLE: dict[tuple[str, str], float] = {}


def _stale(path: Path, held: _Held, lock_fd: int, seconds: float) -> bool:
    """The rule of the module docstring: this machine's dead process, or no heartbeat for LEASE_SECONDS
    (ours or the holder's, the longer)."""
    record = held.record
    if record is None:  # no time to trust: NFSv3 keeps a verifier in the times until the creator has set them
        first = _UNREADABLE.setdefault((str(path), held.identity), time.monotonic())
        return time.monotonic() - first > seconds
    if (record.get("host"), record.get("boot")) == _this_machine():
        pid = record.get("pid")
        if isinstance(pid, int) and pid > 0 and pid != os.getpid() and not _alive(pid, record.get("pid_start")):
            return True
    theirs = record.get("seconds")
    if isinstance(theirs, (int, float)) and 1 <= theirs <= 86400:
        seconds = max(seconds, float(theirs))
    return _file_system_now(lock_fd) - held.mtime > seconds


def _take_over(prefix: Path, target: Path, held: _Held, record: Optional[dict], lock_fd: int, seconds: float,
               depth: int = 0) -> bool:
    """Replace the stale `held` at `target` (the lease, or an abandoned claim) by a file holding `record`,
    or only remove it when `record` is None: True when done, False when another process took it over or is
    doing so (look again later). Claims are named `<prefix>.claim-<identity>.lock`."""
    claim = prefix.with_name(f"{prefix.name}.claim-{held.identity}.lock")
    mine = _record(seconds)
    for _ in range(2):
        try:
            _create(claim, mine)
            break
        except FileExistsError:
            other = _read(claim)  # another process is taking it over, or died doing so
            if other is None:
                continue
            if depth >= 3 or not _stale(claim, other, lock_fd, seconds) or \
                    not _take_over(prefix, claim, other, None, lock_fd, seconds, depth + 1):
                return False
    else:
        return False
    try:
        now = _read(target)
        if now is None or now.identity != held.identity:
            return False  # taken over (or released) by another process since it was read
        _remove(target)  # only a claim's holder removes a stale file: this is still the one judged stale
        if record is None:
            return True
        try:
            _create(target, record)  # a process that arrived in between won: it holds the lease, not us
        except FileExistsError:
            return False
        return True
    finally:
        _remove(claim)


# -- the heartbeat ----------------------------------------------------------------------------------------

class _Heartbeat(threading.Thread):
    """Sets the lease's time every `interval` seconds while it is still this lock's (same token)."""

    def __init__(self, lease: Path, token: str, interval: float):
        super().__init__(name=f"lease {lease}", daemon=True)
        self.lease, self.token, self.interval = lease, token, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                held = _read(self.lease)
                if held is None or held.identity != self.token:
                    holder = held.record if held is not None else None
                    log.warning("lost the lease %s while holding it (now %s): another process may run the same "
                                "work; raise %s if this holder stalled", self.lease,
                                f"{holder.get('host')} pid {holder.get('pid')}" if holder else "absent",
                                LEASE_VARIABLE)
                    return
                os.utime(self.lease)
            except OSError:  # a file-system hiccup: the next beat tries again
                continue

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=30)


class FileLock:
    """An exclusive lock on `path` that holds across the processes of one machine and across the nodes
    sharing a file system (an flock and a lease; see the module docstring). Released when its holder
    releases it; when the holder dies, at once on the same machine, LEASE_SECONDS after its last heartbeat
    from another node."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lease = lease_path(self.path)
        self.fd: Optional[int] = None
        self._token: Optional[str] = None
        self._owner: Optional[int] = None  # the pid that acquired it
        self._heartbeat: Optional[_Heartbeat] = None

    def acquire(self, blocking: bool = True) -> bool:
        if self.fd is not None:
            if self._owner == os.getpid():
                return True
            self._forget()  # inherited across a fork: the parent's lock, not this process's
        seconds = lease_seconds()
        make_folder(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        try:
            record, wait = _record(seconds), _FIRST_POLL
            while not self._take_lease(record, fd, seconds):
                if not blocking:
                    self._unlock(fd)
                    return False
                time.sleep(wait)
                wait = min(_LAST_POLL, wait * 1.5)
        except BaseException:
            self._unlock(fd)
            raise
        self.fd, self._token, self._owner = fd, record["token"], os.getpid()
        self._heartbeat = _Heartbeat(self.lease, record["token"], seconds / 4)
        self._heartbeat.start()
        return True

    def _take_lease(self, record: dict, lock_fd: int, seconds: float) -> bool:
        for _ in range(3):  # a lease released while it was looked at: create it again
            try:
                _create(self.lease, record)
                return True
            except FileExistsError:
                pass
            held = _read(self.lease)
            if held is None:
                continue
            if not _stale(self.lease, held, lock_fd, seconds):
                return False
            return _take_over(_prefix(self.path), self.lease, held, record, lock_fd, seconds)
        return False

    def release(self) -> None:
        if self.fd is None:
            return
        if self._owner != os.getpid():
            self._forget()
            return
        fd, token, heartbeat = self.fd, self._token, self._heartbeat
        self.fd, self._token, self._owner, self._heartbeat = None, None, None, None
        try:
            if heartbeat is not None:
                heartbeat.stop()
            held = _read(self.lease)
            if held is not None and held.identity == token:
                _remove(self.lease)
            else:
                log.warning("the lease %s was no longer this lock's when released (another process took it over "
                            "after a stall longer than %s); it is left to its holder", self.lease, LEASE_VARIABLE)
        finally:
            self._unlock(fd)

    @staticmethod
    def _unlock(fd: int) -> None:
        # Unlock explicitly: a forked worker shares the open file description, and closing only this
        # descriptor would leave the lock held until every copy is closed.
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _forget(self) -> None:
        """In a forked child: close its copy of the descriptor (the parent's flock stays, as does its lease)."""
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self._token, self._owner, self._heartbeat = None, None, None, None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
