"""Locks that hold across nodes (core.locks): an flock for the processes of one machine and a lease file with a
heartbeat for the others.

Other nodes are simulated by forked processes whose flock does nothing (a node-local flock, as on Lustre with
`localflock` or BeeGFS, cannot see another node's) and which report another host name; leases of other
hosts are also written by hand, with their heartbeat's time set by os.utime.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import select
import signal
import threading
import time
import traceback
from pathlib import Path

import pytest

from lxmert.core import locks
from lxmert.core.errors import InputError
from lxmert.core.locks import FileLock, lease_path


class _NodeLocalFlock:
    """fcntl as seen by a node whose flock does not reach the other nodes."""
    LOCK_EX, LOCK_NB, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN

    @staticmethod
    def flock(fd, operation):
        return None


def _as_node(name: str, monkeypatch=None) -> None:
    """This process becomes node `name`: its own host name and boot, a flock the other nodes do not see."""
    machine = (name, f"boot-of-{name}")
    if monkeypatch is not None:
        monkeypatch.setattr(locks, "fcntl", _NodeLocalFlock)
        monkeypatch.setattr(locks, "_this_machine", lambda: machine)
    else:  # in a forked child: never restored, it exits
        locks.fcntl = _NodeLocalFlock
        locks._this_machine = lambda: machine


class _Child:
    """A forked process running `body(child)`; the two sides exchange one-byte messages (send / expect)."""

    def __init__(self, body):
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(down_w)
                os.close(up_r)
                self._rx, self._tx = down_r, up_w
                body(self)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(down_r)
        os.close(up_w)
        self._rx, self._tx = up_r, down_w
        self.code = None

    def send(self, message: bytes) -> None:
        os.write(self._tx, message)

    def expect(self, timeout: float = 20) -> bytes:
        ready, _, _ = select.select([self._rx], [], [], timeout)
        assert ready, f"process {self.pid} sent nothing within {timeout} s"
        return os.read(self._rx, 1)

    def wait(self) -> int:
        if self.code is None:
            self.code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.code


@pytest.fixture
def spawn():
    """Start forked processes; any still running when the test ends is killed (by its pid) and reaped."""
    started: list[_Child] = []

    def start(body) -> _Child:
        child = _Child(body)
        started.append(child)
        return child

    yield start
    for child in started:
        if child.code is None:
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()


def _record(path: Path) -> dict:
    return json.loads(lease_path(path).read_text())


def _write_lease(path: Path, host: str = "elsewhere", age: float = 0.0, **fields) -> dict:
    """A lease written by another process (by default on another host), its heartbeat `age` seconds ago."""
    record = {"host": host, "boot": "boot-of-" + host, "pid": 12345, "pid_start": "1", "token": secrets.token_hex(16),
              "started": "2026-01-01T00:00:00+0000", **fields}
    lease = lease_path(path)
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(json.dumps(record))
    if age:
        now = time.time()
        os.utime(lease, (now - age, now - age))
    return record


def _holder(path: Path, node: str):
    """A child body: as node `node`, take the lock, say 'h', release on 'r', say 'd'."""
    def body(child: _Child) -> None:
        _as_node(node)
        lock = FileLock(path)
        assert lock.acquire(blocking=False)
        child.send(b"h")
        assert child.expect() == b"r"
        lock.release()
        child.send(b"d")
    return body


# -- 1. across nodes -----------------------------------------------------------------------------------------

def test_a_node_cannot_take_a_lock_another_node_holds_until_it_is_released(tmp_path, monkeypatch, spawn):
    """Two nodes whose flocks do not see each other: the lease keeps the second out, non-blocking and
    blocking, until the first releases; the blocked one then gets the lock without a lease timeout."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "300")
    _as_node("node-a", monkeypatch)
    path = tmp_path / "unit" / ".lock"
    holder = spawn(_holder(path, "node-b"))
    assert holder.expect() == b"h"
    held = _record(path)
    assert held["host"] == "node-b" and held["pid"] == holder.pid

    mine = FileLock(path)
    assert not mine.acquire(blocking=False), "the other node's lease holds"
    assert _record(path) == held, "and is left as it was"

    got: list[float] = []
    waiter = threading.Thread(target=lambda: got.append(mine.acquire()))
    waiter.start()
    time.sleep(0.6)
    assert waiter.is_alive() and not got, "a blocking acquire waits"
    released = time.monotonic()
    holder.send(b"r")
    assert holder.expect() == b"d"
    waiter.join(timeout=10)
    assert got == [True] and time.monotonic() - released < 3, "and gets the lock soon after the release"
    assert _record(path)["host"] == "node-a" and _record(path)["pid"] == os.getpid()
    mine.release()
    assert not lease_path(path).exists() and holder.wait() == 0


# -- 2. a holder killed on this machine ------------------------------------------------------------------------

def _zombie(pid: int) -> bool:
    """Whether `pid` has exited (all its threads, the heartbeat's too) and is not reaped yet."""
    with open(f"/proc/{pid}/stat") as fh:
        state = fh.read().rsplit(")", 1)[1].split()[0]
    return state == "Z" and os.listdir(f"/proc/{pid}/task") == [str(pid)]


@pytest.mark.parametrize("flock", ["kernel", "node-local"])
def test_a_holder_killed_on_this_machine_is_taken_over_at_once(tmp_path, monkeypatch, spawn, flock):
    """SIGKILL a holder (its lease stays behind): another process of this machine takes the lock at once, not
    after LEASE_SECONDS (300), also while the dead holder is an unreaped zombie, and also where flock is
    node-local (the lease's pid, not the flock, decides)."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "300")
    if flock == "node-local":
        monkeypatch.setattr(locks, "fcntl", _NodeLocalFlock)
    path = tmp_path / ".lock"

    def hold(child: _Child) -> None:
        assert FileLock(path).acquire(blocking=False)
        child.send(b"h")
        time.sleep(60)

    holder = spawn(hold)
    assert holder.expect() == b"h"
    assert not FileLock(path).acquire(blocking=False), "held while the holder lives"
    os.kill(holder.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _zombie(holder.pid):
        assert time.monotonic() < deadline, "the killed child became a zombie"
        time.sleep(0.01)
    assert _record(path)["pid"] == holder.pid, "the dead holder's lease is still there"

    start = time.monotonic()
    lock = FileLock(path)
    assert lock.acquire(blocking=False), "a zombie holds nothing"
    assert time.monotonic() - start < 1
    assert _record(path)["pid"] == os.getpid()
    lock.release()
    assert holder.wait() == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"], "no lease or claim left behind"


def test_a_lease_of_a_pid_now_reused_is_taken_over_at_once(tmp_path, monkeypatch):
    """A lease of this machine naming a live pid that started at another time (the pid was reused after its
    holder died) is stale at once; the same pid with its own start time holds."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "300")
    host, boot = locks._this_machine()
    path = tmp_path / ".lock"
    parent = os.getppid()
    _write_lease(path, host=host, boot=boot, pid=parent, pid_start=locks._process(parent)[1])
    assert not FileLock(path).acquire(blocking=False), "a live process with its own start time holds"
    _write_lease(path, host=host, boot=boot, pid=parent, pid_start="1")
    lock = FileLock(path)
    assert lock.acquire(blocking=False), "the pid of another process now"
    lock.release()


# -- 3. a lease left by another host --------------------------------------------------------------------------

def test_a_lease_of_another_host_is_taken_over_after_lease_seconds_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "2")
    path = tmp_path / ".lock"

    _write_lease(path, age=10)
    lock = FileLock(path)
    assert lock.acquire(blocking=False), "no heartbeat for 10 s > 2 s: stale"
    assert _record(path)["pid"] == os.getpid()
    lock.release()
    assert not lease_path(path).exists()

    fresh = _write_lease(path, age=0.5)
    before = lease_path(path).stat().st_mtime_ns
    assert not FileLock(path).acquire(blocking=False), "a heartbeat 0.5 s ago: held"
    assert _record(path) == fresh and lease_path(path).stat().st_mtime_ns == before, "and untouched"

    host = locks._this_machine()[0]  # this host name but another boot: another machine (or this one rebooted)
    _write_lease(path, host=host, boot="another-boot", pid=999999999)
    assert not FileLock(path).acquire(blocking=False), "a pid is only checked on this very machine"

    _write_lease(path, age=10, seconds=60)  # its holder runs with LXMERT_LEASE_SECONDS=60
    assert not FileLock(path).acquire(blocking=False), "the holder's longer lease time counts"

    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "1")
    _write_lease(path)
    start = time.monotonic()
    lock = FileLock(path)
    assert lock.acquire()  # blocking: waits for the lease to go stale
    waited = time.monotonic() - start
    lock.release()
    assert 0.9 <= waited < 4, waited


def test_a_lease_without_a_record_is_stale_after_lease_seconds_of_watching(tmp_path, monkeypatch):
    """An empty lease (its creator has not written it yet, or died before it did): its time is not trusted,
    however old; it is taken over after this process has seen it unchanged for LEASE_SECONDS."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "1")
    path = tmp_path / ".lock"
    lease_path(path).write_text("")
    os.utime(lease_path(path), (time.time() - 1000, time.time() - 1000))
    assert not FileLock(path).acquire(blocking=False), "an old time alone does not make it stale"
    start = time.monotonic()
    lock = FileLock(path)
    assert lock.acquire()
    waited = time.monotonic() - start
    assert _record(path)["pid"] == os.getpid()
    lock.release()
    assert 0.5 <= waited < 4, waited


def test_a_lease_is_aged_with_the_file_systems_clock_not_this_nodes(tmp_path, monkeypatch):
    """This node's clock a day ahead does not make a fresh lease stale, a day behind does not keep a stale
    one alive: the age is the lock file's fresh time stamp minus the lease's."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "2")
    path = tmp_path / ".lock"
    real = time.time
    _write_lease(path)
    _write_lease(path.with_name("stale.lock"), age=10)
    monkeypatch.setattr(locks.time, "time", lambda: real() + 86400)
    assert not FileLock(path).acquire(blocking=False)
    monkeypatch.setattr(locks.time, "time", lambda: real() - 86400)
    path = path.with_name("stale.lock")
    lock = FileLock(path)
    assert lock.acquire(blocking=False)
    lock.release()


def test_an_abandoned_claim_does_not_block_a_take_over(tmp_path, monkeypatch):
    """A process killed while taking over a stale lease leaves its claim: on this machine (dead pid) or
    without heartbeat it is removed and the take-over goes on; a live claim of another node wins."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "2")
    path = tmp_path / ".lock"
    host, boot = locks._this_machine()
    for claimer, claim_age, taken in (({"host": host, "boot": boot, "pid": 999999999}, 0, True),
                                      ({"host": "node-c"}, 10, True), ({"host": "node-c"}, 0, False)):
        stale = _write_lease(path, age=10)
        claim = tmp_path / f".lease.claim-{stale['token']}.lock"
        claim.write_text(json.dumps({**stale, **claimer, "token": secrets.token_hex(16)}))
        if claim_age:
            os.utime(claim, (time.time() - claim_age, time.time() - claim_age))
        lock = FileLock(path)
        assert lock.acquire(blocking=False) == taken, claimer
        if taken:
            assert _record(path)["pid"] == os.getpid() and not claim.exists()
            lock.release()
        else:
            assert _record(path) == stale and claim.exists()
    claim.unlink()
    lease_path(path).unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


@pytest.mark.parametrize("slow", [False, True])
def test_nodes_that_see_one_stale_lease_at_once_take_it_over_once(tmp_path, monkeypatch, spawn, slow):
    """Six nodes try a stale lease at the same moment: exactly one takes it over, in every round, and no
    claim is left behind. `slow`: each node waits 0.1 s after judging a lease or claim stale, so that all of
    them act on the same stale lease, some after it has been taken over."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "2")
    path = tmp_path / ".lock"
    for _ in range(5 if slow else 10):
        _write_lease(path, age=10)
        go_r, go_w = os.pipe()

        def contend(child: _Child, index: int, go_r: int = go_r) -> None:
            _as_node(f"node-{index}")
            if slow:
                judge = locks._stale

                def stale_then_wait(*args) -> bool:
                    if judge(*args):
                        time.sleep(0.1)
                        return True
                    return False

                locks._stale = stale_then_wait
            lock = FileLock(path)
            assert os.read(go_r, 1) == b"g"
            child.send(b"1" if lock.acquire(blocking=False) else b"0")
            assert child.expect() == b"e"
            lock.release()

        nodes = [spawn(lambda child, i=i: contend(child, i)) for i in range(6)]
        os.close(go_r)
        os.write(go_w, b"g" * len(nodes))
        results = [node.expect() for node in nodes]
        assert results.count(b"1") == 1, results
        winner = results.index(b"1")
        assert _record(path)["host"] == f"node-{winner}"
        for node in nodes:
            node.send(b"e")
        assert [node.wait() for node in nodes] == [0] * len(nodes)
        os.close(go_w)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"], "the winner removed its lease, no claim left"


# -- 4. the heartbeat ------------------------------------------------------------------------------------------

def test_the_heartbeat_keeps_a_long_held_lease_alive(tmp_path, monkeypatch, spawn):
    """LEASE_SECONDS=1: a lease held 3 s by another node is never stale to this one; its time moves on."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "1")
    _as_node("node-a", monkeypatch)
    path = tmp_path / ".lock"
    holder = spawn(_holder(path, "node-b"))
    assert holder.expect() == b"h"
    token, first = _record(path)["token"], lease_path(path).stat().st_mtime
    end = time.monotonic() + 3
    while time.monotonic() < end:
        assert not FileLock(path).acquire(blocking=False), "the lease is kept alive"
        time.sleep(0.1)
    assert _record(path)["token"] == token and lease_path(path).stat().st_mtime >= first + 2
    holder.send(b"r")
    assert holder.expect() == b"d" and holder.wait() == 0
    lock = FileLock(path)
    assert lock.acquire(blocking=False)
    lock.release()


# -- 5. release checks the token -----------------------------------------------------------------------------

def test_release_never_removes_another_holders_lease(tmp_path, monkeypatch):
    """A holder whose lease was taken over (after a stall longer than LEASE_SECONDS) neither keeps the new
    holder's lease alive nor removes it on release; its flock is released."""
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", "1")
    path = tmp_path / ".lock"
    lock = FileLock(path)
    assert lock.acquire()
    other = _write_lease(path, age=100)  # the take-over, as another node does it
    time.sleep(0.8)  # three heartbeats
    assert time.time() - lease_path(path).stat().st_mtime > 90, "the heartbeat does not touch another's lease"
    lock.release()
    assert _record(path) == other, "release left the other holder's lease"
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the flock were still held
    finally:
        os.close(fd)


# -- 6. the variable -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["abc", "", "0", "0.5", "-3", "86401", "nan", "inf"])
def test_a_bad_lease_seconds_is_one_input_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("LXMERT_LEASE_SECONDS", value)
    with pytest.raises(InputError, match="LXMERT_LEASE_SECONDS") as info:
        FileLock(tmp_path / "unit" / ".lock").acquire()
    assert "\n" not in str(info.value) and "[1, 86400]" in str(info.value)
    assert not (tmp_path / "unit").exists(), "refused before anything is made"


def test_good_lease_seconds(monkeypatch):
    monkeypatch.delenv("LXMERT_LEASE_SECONDS", raising=False)
    assert locks.lease_seconds() == 300
    for value, seconds in (("1", 1), ("2.5", 2.5), ("86400", 86400)):
        monkeypatch.setenv("LXMERT_LEASE_SECONDS", value)
        assert locks.lease_seconds() == seconds


# -- forks and names -------------------------------------------------------------------------------------------

def test_a_lock_held_across_a_fork_stays_the_parents(tmp_path, spawn):
    """A child forked while its parent holds a lock neither releases it (release closes its copy only) nor
    holds it (acquire takes the lock anew and finds it taken)."""
    path = tmp_path / ".lock"
    lock = FileLock(path)
    assert lock.acquire()
    token = _record(path)["token"]

    def child_body(child: _Child) -> None:
        lock.release()
        assert lease_path(path).exists() and not FileLock(path).acquire(blocking=False)
        assert not lock.acquire(blocking=False)

    child = spawn(child_body)
    assert child.wait() == 0
    assert _record(path)["token"] == token and not FileLock(path).acquire(blocking=False)
    lock.release()
    assert not lease_path(path).exists()
    again = FileLock(path)
    assert again.acquire(blocking=False)
    again.release()


def test_lease_files_end_in_lock():
    """Lease and claim files are named like lock files, which the crash test and cleanups leave alone."""
    assert lease_path(Path("u/.lock")) == Path("u/.lease.lock")
    assert lease_path(Path("r/.tables.lock")) == Path("r/.tables.lease.lock")
    assert lease_path(Path("d/.init.safetensors.lock")) == Path("d/.init.safetensors.lease.lock")
