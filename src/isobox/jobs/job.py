"""``Job``: the engine's Windows Job object, on a cgroup (v1 or v2).

A job has limits (:mod:`isobox.jobs.limits`), holds processes (its children are born in it
and cannot leave), keeps accounting that includes processes that already ended, sends
events when a limit is hit, nests (a child job's limits are clamped to its parent's and its
accounting rolls up), can be frozen, thawed and terminated, and with *kill on close* takes
every process with it when it is closed — or when its owner dies, even by SIGKILL: a small
reaper process, started with the job, holds the other end of a pipe from the owner and
cleans up when that pipe closes.

How it is watched, without polling loops that burn CPU: one monitor thread per top-level
job sleeps in ``select`` on the kernel's process-event socket (fork/exit of every process,
to count processes), an inotify descriptor on the cgroup's ``*.events`` files (process limit,
v2 memory events) and v1's OOM eventfd, and wakes once a second to read the throttling and
memory-limit counters (which have no notification on v1).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from isobox._sys.inotify import Inotify
from isobox._sys.procevents import Exit, Fork, ProcEvents
from isobox.errors import Conflict, InvalidArgument, IsoboxError
from isobox.jobs.cgroup import Cgroup, Counters, describe, detect
from isobox.jobs.limits import Accounting, EventKind, JobEvent, Limits

EventCallback = Callable[[JobEvent], None]
_SPAWN_SH = 'kill -STOP $$; exec "$@"'


class Job:
    def __init__(
        self,
        name: str | None = None,
        *,
        limits: Limits | None = None,
        parent: Job | None = None,
        kill_on_close: bool = True,
        on_event: EventCallback | None = None,
    ) -> None:
        self.name = name or f"job-{uuid.uuid4().hex[:10]}"
        if "/" in self.name or self.name.startswith(".") or not self.name:
            raise InvalidArgument(f"invalid job name {self.name!r}")
        self.parent = parent
        self.children: list[Job] = []
        self.kill_on_close = kill_on_close
        self.requested: Limits = (limits or Limits()).validate()
        self.effective: Limits = (
            self.requested.clamp_to(parent.effective) if parent else self.requested
        )
        self.ncpu = os.cpu_count() or 1
        self._on_event = on_event
        self._events: list[JobEvent] = []
        self._cond = threading.Condition()
        self.total_processes = 0
        self.terminated_processes = 0
        self.killed_by_limit = 0
        self._last = Counters()
        self._pending_oom = 0
        self._pending_aged = False
        self.closed = False
        self.cgroup: Cgroup = parent.cgroup.child(self.name) if parent else detect(self.name)
        if self.cgroup.exists():
            raise Conflict(f"a job named {self.name!r} exists already")
        self.cgroup.create()
        try:
            self.cgroup.set_limits(self.effective, self.ncpu)
            self._last = self.cgroup.read()
            if parent is None:
                self._monitor: _Monitor = _Monitor(self)
                self._reaper = _start_reaper(self) if kill_on_close else None
            else:
                self._monitor = parent._monitor
                self._reaper = None
                parent.children.append(self)
            self._monitor.watch(self)
        except BaseException:
            with contextlib.suppress(IsoboxError, OSError):
                self.cgroup.remove()
            raise

    # ---- processes -----------------------------------------------------------------

    def spawn(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the job; it and everything it starts stay in the job.

        The child is started by ``/bin/sh``, which stops itself before ``exec``; the job
        places it (cgroup, per-process memory limit) while it is stopped and then lets it
        go, so not one instruction of ``argv`` runs outside the job.
        """
        if self.closed:
            raise Conflict(f"job {self.name} is closed")
        if not argv:
            raise InvalidArgument("nothing to run")
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["/bin/sh", "-c", _SPAWN_SH, "isobox-job", *argv], **popen
        )
        try:
            os.waitid(os.P_PID, proc.pid, os.WSTOPPED)
            self.assign(proc.pid)
            os.kill(proc.pid, signal.SIGCONT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return proc

    def assign(self, pid: int) -> None:
        """Move a running process into the job (its later children are born in it)."""
        self.cgroup.add(pid)
        if self.effective.process_memory is not None:
            import resource

            lim = self.effective.process_memory
            resource.prlimit(pid, resource.RLIMIT_AS, (lim, lim))
        self._monitor.track(pid, self)

    def pids(self) -> list[int]:
        return self.cgroup.pids()

    # ---- limits --------------------------------------------------------------------

    def update(self, limits: Limits) -> None:
        """Change limits while the job runs; children are re-clamped."""
        requested = self.requested.merge(limits.validate())
        effective = requested.clamp_to(self.parent.effective) if self.parent else requested
        self.cgroup.set_limits(effective, self.ncpu)
        self.requested, self.effective = requested, effective
        for child in self.children:
            child.update(Limits())

    # ---- accounting and events ---------------------------------------------------------

    def _subtree(self) -> list[Job]:
        out = [self]
        for c in self.children:
            out += c._subtree()
        return out

    def accounting(self) -> Accounting:
        self._monitor.drain()
        c = self.cgroup.read()
        jobs = self._subtree()
        return Accounting(
            cpu_user_s=c.cpu_user_ns / 1e9,
            cpu_kernel_s=c.cpu_kernel_ns / 1e9,
            memory_current_bytes=c.memory_current,
            memory_peak_bytes=c.memory_peak,
            page_faults=c.page_faults,
            io_read_bytes=c.io_read_bytes,
            io_write_bytes=c.io_write_bytes,
            io_read_ops=c.io_read_ops,
            io_write_ops=c.io_write_ops,
            total_processes=sum(j.total_processes for j in jobs),
            active_processes=len(self.pids()) if self.cgroup.exists() else 0,
            terminated_processes=sum(j.terminated_processes for j in jobs),
            killed_by_limit=sum(j.killed_by_limit for j in jobs),
            cpu_throttled_periods=c.throttled_periods,
        )

    def events(self) -> list[JobEvent]:
        with self._cond:
            return list(self._events)

    def wait_event(self, kind: EventKind, timeout: float) -> JobEvent | None:
        """The first event of ``kind`` (already received or arriving within ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._events:
                    if ev.kind == kind:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _emit(self, kind: EventKind, pid: int | None = None, count: int = 1) -> None:
        ev = JobEvent(kind, self.name, time.time(), pid, count)
        job: Job | None = self
        while job is not None:  # a child's notifications reach its ancestors too
            with job._cond:
                job._events.append(ev)
                job._cond.notify_all()
            if job._on_event is not None:
                job._on_event(ev)
            job = job.parent

    def _check_counters(self) -> None:
        """Compare the cgroup's counters with the last reading; emit what changed."""
        if not self.cgroup.exists():
            return
        now = self.cgroup.read()
        last, self._last = self._last, now
        if now.memory_limit_hits > last.memory_limit_hits:
            self._emit("memory_limit", count=now.memory_limit_hits - last.memory_limit_hits)
        if now.pids_limit_hits > last.pids_limit_hits:
            self._emit("process_limit", count=now.pids_limit_hits - last.pids_limit_hits)
        if now.throttled_periods > last.throttled_periods:
            self._emit("cpu_throttled", count=now.throttled_periods - last.throttled_periods)
        if now.oom_kills > last.oom_kills:
            self._pending_oom += now.oom_kills - last.oom_kills

    # ---- control -------------------------------------------------------------------

    def freeze(self) -> None:
        self.cgroup.freeze()

    def thaw(self) -> None:
        self.cgroup.thaw()

    def terminate(self) -> None:
        """Kill every process in the job and its children, forks in flight included."""
        self.cgroup.kill_all()
        self._monitor.drain()

    def close(self) -> None:
        """Close the job: with kill-on-close, terminate it; remove its cgroups."""
        if self.closed:
            return
        for child in list(self.children):
            child.close()
        if self.kill_on_close:
            self.terminate()
        elif self.pids():
            raise Conflict(f"job {self.name} still has processes and is not kill-on-close")
        self._monitor.drain()
        self._monitor.unwatch(self)
        self.cgroup.remove()
        self.closed = True
        if self.parent is not None:
            self.parent.children.remove(self)
        else:
            self._monitor.stop()
            if self._reaper is not None:
                assert self._reaper.stdin is not None
                self._reaper.stdin.close()
                self._reaper.wait(timeout=10)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_reaper(job: Job) -> subprocess.Popen[bytes]:
    """A process outside the job that cleans it up when the owner's pipe closes."""
    desc = json.dumps({"cgroup": describe(job.cgroup), "kill": job.kill_on_close})
    return subprocess.Popen(
        [sys.executable, "-m", "isobox.jobs.reaper", desc],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
    )


class _Monitor:
    """One thread per top-level job: process events, cgroup event files, a 1 s tick."""

    TICK = 1.0

    def __init__(self, root: Job) -> None:
        self.root = root
        self.members: dict[int, Job] = {}
        self.jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._procs = ProcEvents()
        self._inotify = Inotify()
        self._wd: dict[int, Job] = {}
        self._efd: dict[int, Job] = {}
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._procs.fd, selectors.EVENT_READ, "procs")
        self._sel.register(self._inotify.fd, selectors.EVENT_READ, "inotify")
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"job-{root.name}", daemon=True)
        self._thread.start()

    def watch(self, job: Job) -> None:
        w = job.cgroup.watches()
        with self._lock:
            self.jobs[job.name] = job
            for f in w.files:
                if os.path.exists(f):
                    self._wd[self._inotify.add_watch(f)] = job
            for fd in w.eventfds:
                self._efd[fd] = job
                self._sel.register(fd, selectors.EVENT_READ, "eventfd")

    def unwatch(self, job: Job) -> None:
        with self._lock:
            for fd, j in list(self._efd.items()):
                if j is job:
                    self._sel.unregister(fd)
                    del self._efd[fd]
            for wd, j in list(self._wd.items()):
                if j is job:
                    del self._wd[wd]
            self.jobs.pop(job.name, None)

    def track(self, pid: int, job: Job) -> None:
        with self._lock:
            if self.members.get(pid) is not job:
                self.members[pid] = job
                job.total_processes += 1

    def drain(self) -> None:
        """Handle every event the kernel has queued up to now (called by readers)."""
        with self._lock:
            self._handle_procs()
            for job in list(self.jobs.values()):
                job._check_counters()

    def _run(self) -> None:
        next_tick = time.monotonic() + self.TICK
        while not self._stop:
            timeout = max(0.0, next_tick - time.monotonic())
            ready = self._sel.select(timeout)
            with self._lock:
                for key, _ in ready:
                    if key.data == "procs":
                        self._handle_procs()
                    elif key.data == "inotify":
                        for wd in self._inotify.read():
                            job = self._wd.get(wd)
                            if job is not None:
                                job._check_counters()
                    elif key.data == "eventfd":
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(key.fd)
                        self._efd[key.fd]._check_counters()
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 64)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.TICK
                    for job in list(self.jobs.values()):
                        job._check_counters()
                        # An OOM kill whose exit was not seen within a tick: report it
                        # without a pid rather than not at all.
                        if job._pending_oom and job._pending_aged:
                            self._attribute_oom(job, None)
                        job._pending_aged = job._pending_oom > 0

    def _handle_procs(self) -> None:
        for ev in self._procs.read():
            if isinstance(ev, Fork):
                if ev.child_pid == ev.child_tgid and ev.parent_tgid in self.members:
                    self.track(ev.child_pid, self.members[ev.parent_tgid])
            elif isinstance(ev, Exit) and ev.pid == ev.tgid:
                job = self.members.pop(ev.pid, None)
                if job is None:
                    continue
                job.terminated_processes += 1
                if os.WIFSIGNALED(ev.status) and os.WTERMSIG(ev.status) == signal.SIGKILL:
                    self._attribute_oom(job, ev.pid)

    def _attribute_oom(self, job: Job, pid: int | None) -> None:
        """An OOM kill counted by the cgroup of ``job`` or an ancestor, matched to ``pid``.

        A SIGKILL exit is an OOM kill when an OOM-kill counter on the job's path went up.
        A counter that went up with no exit seen (an event lost) is reported with no pid.
        """
        j: Job | None = job
        while j is not None:
            if pid is not None:
                j._check_counters()
            if j._pending_oom > 0:
                j._pending_oom -= 1
                job.killed_by_limit += 1 if pid is not None else 0
                job._emit("oom_kill", pid=pid)
                return
            j = j.parent

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self._sel.close()
        self._procs.close()
        self._inotify.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
