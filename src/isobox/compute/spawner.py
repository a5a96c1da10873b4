"""Starting monitors: a single-threaded zygote that forks them, on the daemon's behalf.

The daemon has threads (HTTP handlers); forking from a threaded process is what DESIGN.md
forbids (a lock held by another thread at fork time stays held in the child forever). So
``Spawner()`` — made by the daemon *before any thread exists* — forks a zygote: a process
with the engine imported and one thread, which forks each monitor (double fork + setsid:
the monitor's parent becomes pid 1, it outlives the daemon and the zygote, and it is no
process group's or terminal's member). The daemon talks to the zygote over a SEQPACKET
socketpair: ``{"spawn": plan_path}`` → ``{"ok": true}`` with the read end of the monitor's
readiness pipe (SCM_RIGHTS), so the zygote is free again at once and the daemon waits for
the monitor itself. The monitor writes one message on that pipe: ``{"ok": true, "pid"}``,
or ``{"error": {"kind", "message"}}`` after undoing what it made; :meth:`Spawner.spawn`
raises that error as the same :mod:`isobox.errors` class.

Descriptors: the zygote closes every descriptor it inherited but its socket (the daemon's
database, listening socket, ...); a monitor closes every one but its readiness pipe. A dead
zygote is replaced on the next spawn — then by fork *and exec* (``python -m
isobox.compute.spawner FD``), which is safe from a threaded daemon.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from isobox.errors import IsoboxError

SPAWN_TIMEOUT = 120.0
_MAX_MSG = 1 << 16


def _close_fds_except(keep: set[int]) -> None:
    """Close every descriptor but ``keep``. Unreachable Python objects are finalized first
    and the rest frozen, so no finalizer closes a number that is reused later."""
    gc.collect()
    gc.freeze()
    try:
        fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _preload() -> None:
    """What monitors need, imported once here instead of in every monitor."""
    import isobox.compute.monitor
    import isobox.jobs.job
    import isobox.silo.container
    import isobox.silo.execin
    import isobox.spec.compute
    import isobox.spec.runtime  # noqa: F401

    _warm_seccomp()


def _warm_seccomp() -> None:
    """The engine's default seccomp profile compiled once here: every monitor forked from
    this zygote inherits the program instead of compiling it again (a cache keyed by the
    whole profile: a container with another profile compiles its own)."""
    from isobox._sys import seccomp
    from isobox.errors import IsoboxError
    from isobox.spec.runtime import DEFAULT_CAPABILITIES

    try:
        seccomp.compile_cached(seccomp.default_profile(DEFAULT_CAPABILITIES))
    except (IsoboxError, OSError) as exc:  # no libseccomp: each start reports it
        print(f"zygote: seccomp profile not precompiled: {exc}", file=sys.stderr)


def _fork_monitor(plan_path: str) -> int:
    """Double fork + setsid; returns the read end of the readiness pipe."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the intermediate
        code = 1
        try:
            os.setsid()
            if os.fork() == 0:  # the monitor
                mcode = 1
                try:
                    from isobox.compute.monitor import run_monitor

                    _close_fds_except({0, 1, 2, w})
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    mcode = run_monitor(Path(plan_path), w)
                finally:
                    os._exit(mcode)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    return r


def zygote_main(fd: int) -> None:
    """Serve spawn requests on ``fd`` until the daemon closes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's ^C is the daemon's
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _close_fds_except({0, 1, 2, fd})
    _preload()
    from isobox.jobs.cgroup import prime_attach

    # What the preload made is frozen too: each monitor's _close_fds_except collects only
    # what it made itself (a full collection of the engine's objects took ~4 ms a start),
    # and pages the collector would touch stay shared with the zygote.
    gc.collect()
    gc.freeze()
    sock = socket.socket(fileno=fd)
    while True:
        try:
            data = sock.recv(_MAX_MSG)
        except OSError:
            break
        if not data:
            break
        try:
            req = json.loads(data)
            r = _fork_monitor(str(req["spawn"]))
        except Exception as exc:
            from isobox.compute.monitor import wire_error

            with contextlib.suppress(OSError):
                sock.send(json.dumps({"error": wire_error(exc)}).encode())
            continue
        try:
            socket.send_fds(sock, [b'{"ok": true}'], [r])
        except OSError:
            break
        finally:
            os.close(r)
        # While the monitor sets up, the grace period its container's move into a cgroup
        # would wait for (5-20 ms) passes here instead (we are idle until the next request).
        prime_attach()


class Spawner:
    """The daemon's handle on its zygote. Thread-safe; make it before any thread starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = 0
        self._popen: subprocess.Popen[bytes] | None = None
        if threading.active_count() > 1:
            self._exec()  # made too late (threads exist): fork + exec is the safe way
        else:
            self._fork()

    @property
    def zygote_pid(self) -> int:
        return self._pid

    def _fork(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                zygote_main(theirs.fileno())
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self._sock, self._pid = ours, pid

    def _exec(self) -> None:
        """A new zygote from a (maybe threaded) daemon: fork and exec, no Python between."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "isobox.compute.spawner", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock, self._pid, self._popen = ours, proc.pid, proc

    def _reap_zygote(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5)
            self._popen = None
        elif self._pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
        self._pid = 0

    def _ask(self, plan_path: Path) -> tuple[dict[str, Any], list[int]]:
        """One request to the zygote; a dead zygote is replaced and asked once more."""
        for attempt in range(2):
            if self._sock is None:
                self._exec()
            assert self._sock is not None
            try:
                self._sock.send(json.dumps({"spawn": str(plan_path)}).encode())
                data, fds, _, _ = socket.recv_fds(self._sock, _MAX_MSG, 1)
            except OSError:
                data, fds = b"", []
            if data:
                return json.loads(data), fds
            for fd in fds:
                os.close(fd)
            self._reap_zygote()
            if attempt:
                break
        raise IsoboxError("the monitor spawner (zygote) is not answering")

    def spawn(self, plan_path: Path, timeout: float = SPAWN_TIMEOUT) -> int:
        """Start a monitor for the plan at ``plan_path``; its pid once it is ready (root
        mounted, container created, socket listening). Raises what the monitor reported."""
        from isobox.compute.monitor import error_from_wire

        with self._lock:
            reply, fds = self._ask(plan_path)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise error_from_wire(reply["error"])
        if len(fds) != 1:
            raise IsoboxError("the monitor spawner sent no readiness pipe")
        return _await_ready(fds[0], timeout)

    def close(self) -> None:
        with self._lock:
            self._reap_zygote()

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _await_ready(fd: int, timeout: float) -> int:
    """One JSON message on the readiness pipe. Not read to its end: the container's init
    holds a copy of the write end until it starts (it closes its descriptors then)."""
    from isobox.compute.monitor import error_from_wire

    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise IsoboxError(f"the monitor did not become ready within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, _MAX_MSG)
            if not chunk:
                raise IsoboxError("the monitor exited during start-up (see the container's "
                                  "monitor.log)")
            buf += chunk
            try:
                msg = json.loads(buf)
            except ValueError:
                continue
            if "error" in msg:
                raise error_from_wire(msg["error"])
            return int(msg["pid"])
    finally:
        os.close(fd)


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]))
