"""``Job``: the engine's Windows Job object, on a cgroup (v1 or v2).

A job has limits (:mod:`isobox.jobs.limits`), holds processes (its children are born in it),
keeps accounting that includes processes that already ended, sends events when a limit is
hit, nests (a child job's limits are clamped to its parent's and its accounting rolls up),
can be frozen, thawed and terminated, and with *kill on close* takes every process with it
when it is closed — or when its owner dies, even by SIGKILL: a small reaper process, started
with every top-level job, holds the other end of a pipe from the owner and cleans up when
that pipe closes (without kill-on-close it waits for the job to empty first).

**What keeps a process in its job.** A process cannot leave by forking: its children are born
in the job. But a *host* job runs processes in the host's namespaces, and a process there
with effective uid 0 can move itself (or any process) to another cgroup: on cgroup v1 one
write to a ``cgroup.procs`` file is enough, with no capability at all. A job cannot prevent
that by itself. What it does:

* every hierarchy counts: a process that left only some of the job's hierarchies (v1) is
  still listed by :meth:`Job.pids` and killed by :meth:`Job.terminate` and kill-on-close;
* ``spawn(..., confine=True)`` starts the command in a mount namespace where every cgroup
  filesystem is read-only, without CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_SYS_MODULE (see
  :mod:`isobox.jobs.confine`): it and its descendants cannot move themselves out, nor
  loosen the job's limits. It is opt-in because ordinary root commands need those
  capabilities (mount, ptrace-based debuggers, ...);
* not closed: a root process, confined or not, that gets something *outside* the job to act
  for it (a privileged daemon, a kernel usermode helper it configures). A process that has
  left every hierarchy of the job is no longer in it: not counted, not limited, not killed.
  Untrusted code belongs in process isolation (namespaces, no host root), not a host job.

How it is watched, without polling loops that burn CPU: one monitor thread per top-level
job sleeps in ``select`` on the kernel's process-event socket (fork/exit of every process,
to count processes), an inotify descriptor on the cgroup's ``*.events`` files (process limit,
v2 memory events) and v1's OOM eventfd, and wakes once a second to read the throttling and
memory-limit counters (which have no notification on v1) and to pick up members it has not
seen born (see :class:`_Monitor`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from isobox._sys.inotify import Inotify
from isobox._sys.procevents import Exit, Fork, ProcEvents
from isobox.errors import Conflict, InvalidArgument, IsoboxError
from isobox.jobs.cgroup import Cgroup, Counters, describe, detect, enforced_cpu_rate
from isobox.jobs.limits import (
    Accounting,
    EventKind,
    JobEvent,
    Limits,
    format_cpuset,
    parse_cpuset,
)

log = logging.getLogger("isobox.jobs")

EventCallback = Callable[[JobEvent], None]
_SPAWN_SH = 'kill -STOP $$; exec "$@"'
_CONFINE = str(Path(__file__).with_name("confine.py"))
# The limit fields written to the cgroup (process_memory is an rlimit, set on assign).
_CGROUP_FIELDS = ("cpu_rate", "cpu_weight", "memory", "pids", "cpuset", "io")


def _enforceable(limits: Limits, ncpu: int) -> Limits:
    """``limits`` with a CpuRate the kernel cannot enforce raised to the nearest one it can
    (and ``cpu_rate`` listed in ``clamped``)."""
    if limits.cpu_rate is None:
        return limits
    real = enforced_cpu_rate(limits.cpu_rate, ncpu)
    if real == limits.cpu_rate:
        return limits
    clamped = limits.clamped if "cpu_rate" in limits.clamped else (*limits.clamped, "cpu_rate")
    return replace(limits, cpu_rate=real, clamped=clamped)


def _looser(old: Limits, new: Limits) -> Limits:
    """For the limits the kernel checks across a hierarchy (v1 CPU quota, cpuset): the
    loosest of ``old`` and ``new``, which is valid under the old and the new parent alike."""
    out = old
    if old.cpu_rate is not None and new.cpu_rate is not None:
        out = replace(out, cpu_rate=max(old.cpu_rate, new.cpu_rate))
    if old.cpuset is not None and new.cpuset is not None:
        out = replace(out, cpuset=format_cpuset(parse_cpuset(old.cpuset)
                                                | parse_cpuset(new.cpuset)))
    return out


class Job:
    closed: bool

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
        if parent is not None and parent.closed:
            raise Conflict(f"job {parent.name} is closed")
        self.parent = parent
        self.children: list[Job] = []
        self.kill_on_close = kill_on_close
        self.ncpu = os.cpu_count() or 1
        self.requested: Limits = (limits or Limits()).validate()
        self.effective: Limits = _enforceable(
            self.requested.clamp_to(parent.effective) if parent else self.requested, self.ncpu)
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
        # Exclusive: the job's own folder must be new, so two owners can never share one
        # (an existing one is a Conflict, and is not ours to remove below).
        self.cgroup.exclusive = True
        try:
            self.cgroup.create()
        except BaseException:
            if parent is None:  # parents it made (never another job's folder: not empty)
                with contextlib.suppress(IsoboxError, OSError):
                    self.cgroup.remove_parents()
            raise
        monitor: _Monitor | None = None
        reaper: subprocess.Popen[bytes] | None = None
        try:
            self.cgroup.set_limits(self.effective, self.ncpu)
            self._last = self.cgroup.read()
            if parent is None:
                monitor = _Monitor(self)
                reaper = _start_reaper(self)
            else:
                monitor = parent._monitor
            self._monitor: _Monitor = monitor
            self._reaper = reaper
            monitor.watch(self)
            if parent is not None:
                parent.children.append(self)
        except BaseException:
            # Undo everything made above: a failed Job() leaves no thread, descriptor,
            # reaper or cgroup behind.
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.unwatch(self)
                if parent is None:
                    with contextlib.suppress(Exception):
                        monitor.stop()
            if reaper is not None:
                _stop_reaper(reaper)
            with contextlib.suppress(IsoboxError, OSError):
                self.cgroup.remove()
            if parent is None:
                with contextlib.suppress(IsoboxError, OSError):
                    self.cgroup.remove_parents()
            raise

    # ---- processes -----------------------------------------------------------------

    def spawn(
        self, argv: Sequence[str], *, confine: bool = False,
        before_start: Callable[[int], None] | None = None, **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the job; it and everything it starts are born in the job.

        The child is started by ``/bin/sh``, which stops itself before ``exec``; the job
        places it (cgroup, per-process memory limit) while it is stopped, calls
        ``before_start(pid)`` if given (``isobox job run`` hands it the terminal there),
        and then lets it go, so not one instruction of ``argv`` runs outside the job.

        ``confine=True``: the command cannot move itself out of the job's cgroups, even as
        root (see :mod:`isobox.jobs.confine` and the module documentation for what that
        covers). It then runs without CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_SYS_MODULE and
        in a mount namespace of its own (host mounts still propagate into it). Off by
        default: those are what ordinary root commands (mount, debuggers) need.
        """
        if self.closed:
            raise Conflict(f"job {self.name} is closed")
        if not argv:
            raise InvalidArgument("nothing to run")
        prefix = [sys.executable, "-I", "-S", _CONFINE, "--"] if confine else []
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["/bin/sh", "-c", _SPAWN_SH, "isobox-job", *prefix, *argv], **popen
        )
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
            if info is None or info.si_code != os.CLD_STOPPED:
                raise IsoboxError(f"job {self.name}: the launcher of {argv[0]!r} ended "
                                  "before it could be placed in the job")
            os.waitid(os.P_PID, proc.pid, os.WSTOPPED)  # consume the stop report
            self.assign(proc.pid)
            if before_start is not None:
                before_start(proc.pid)
            os.kill(proc.pid, signal.SIGCONT)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return proc

    def assign(self, pid: int) -> None:
        """Move a running process into the job (its later children are born in it).

        On v1 the process is stopped while it is moved (see ``CgroupV1.move_in``). A process
        already counted by a job of this tree is moved with its count, not counted again;
        one counted by another tree's job is released from that one.
        """
        if self.closed:
            raise Conflict(f"job {self.name} is closed")
        mon = self._monitor
        with mon._lock:
            # Events queued so far first: an exit of an earlier process with this pid
            # (pid reuse) must be counted before this one is tracked.
            mon.flush_procs()
            self.cgroup.move_in(pid)
            if self.effective.process_memory is not None:
                import resource

                lim = self.effective.process_memory
                resource.prlimit(pid, resource.RLIMIT_AS, (lim, lim))
            mon.track(pid, self, moved=True)
        for other in list(_MONITORS):
            if other is not mon:
                other.release(pid)

    def pids(self) -> list[int]:
        return self.cgroup.pids()

    # ---- limits --------------------------------------------------------------------

    def update(self, limits: Limits) -> None:
        """Change limits while the job runs; nested jobs are re-clamped.

        v1 checks a CPU quota and a cpuset against the parent's and the children's on each
        write, so the order matters: first, top down, the loosest of old and new values
        (valid under either); then, deepest first, the new values. Each value is written
        on its own and ``effective`` follows every successful write, so after a failure it
        still says what the kernel enforces.
        """
        requested = self.requested.merge(limits.validate())
        plan: list[tuple[Job, Limits]] = []  # parents before their children

        def visit(job: Job, req: Limits, parent: Limits | None) -> None:
            eff = _enforceable(req.clamp_to(parent) if parent is not None else req, job.ncpu)
            plan.append((job, eff))
            for child in job.children:
                visit(child, child.requested, eff)

        visit(self, requested, self.parent.effective if self.parent else None)
        for job, new in plan:
            job._write_limits(_looser(job.effective, new))
        for job, new in reversed(plan):
            job._write_limits(new)
            job.effective = new
        self.requested = requested

    def _write_limits(self, target: Limits) -> None:
        for name in _CGROUP_FIELDS:
            value = getattr(target, name)
            if value in (None, ()) or value == getattr(self.effective, name):
                continue
            self.cgroup.set_limits(Limits(**{name: value}), self.ncpu)
            self.effective = replace(self.effective, **{name: value})
        if target.process_memory != self.effective.process_memory:
            self.effective = replace(self.effective, process_memory=target.process_memory)

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
                try:
                    job._on_event(ev)
                except Exception:
                    log.exception("job %s: on_event callback failed on %s", job.name, kind)
            job = job.parent

    def _check_counters(self) -> None:
        """Compare the cgroup's counters with the last reading; emit what changed."""
        if self.closed or not self.cgroup.exists():
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
        """Kill every process in the job and its children, forks in flight included (and
        those of frozen nested jobs: they are thawed after the kill)."""
        self.cgroup.kill_all()
        self._monitor.drain()

    def close(self) -> None:
        """Close the job: with kill-on-close, terminate it; remove its cgroups.

        May be called from an ``on_event`` callback (on the monitor thread).
        """
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
            with contextlib.suppress(IsoboxError, OSError):
                self.cgroup.remove_parents()
            self._monitor.stop()
            if self._reaper is not None:
                _stop_reaper(self._reaper)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_reaper(job: Job) -> subprocess.Popen[bytes]:
    """A process outside the job that cleans it up when the owner's pipe closes: with
    kill-on-close it kills what is left; without, it waits for the job to empty. Either way
    it then removes the cgroups (and their empty parents)."""
    desc = json.dumps({"cgroup": describe(job.cgroup), "kill": job.kill_on_close})
    return subprocess.Popen(
        [sys.executable, "-m", "isobox.jobs.reaper", desc],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
    )


def _stop_reaper(reaper: subprocess.Popen[bytes]) -> None:
    if reaper.stdin is not None:
        with contextlib.suppress(OSError):
            reaper.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        reaper.wait(timeout=10)  # it sees the job gone and exits; else it finishes alone


_MONITORS: weakref.WeakSet[_Monitor] = weakref.WeakSet()


class _Monitor:
    """One thread per top-level job: process events, cgroup event files, a 1 s tick.

    Process counting. A fork whose parent is a member makes the child a member of the same
    job; an exit of a member counts as terminated. Three cases are caught otherwise:

    * a child made with CLONE_PARENT has the member's *parent* as its parent in the fork
      event. When that parent is this owner (the job's top processes are the owner's
      children), the child's cgroup is read from ``/proc`` (one read per fork *of the
      owner*, never per fork of the host); it is counted, and reaped by the monitor when it
      exits (the owner's code does not know it). Otherwise it is counted at the next tick
      if it still runs then: each tick compares each job's member list with its cgroup's;
    * a pid reused before its exit event was handled: ``assign`` handles queued events
      before tracking;
    * events the kernel dropped (ENOBUFS, a fork storm): membership is reconciled with the
      cgroups, and members no longer in them are counted as ended.
    """

    TICK = 1.0

    def __init__(self, root: Job) -> None:
        self.root = root
        self.members: dict[int, Job] = {}
        self.jobs: dict[str, Job] = {}  # by cgroup path: nested names may repeat
        self._lock = threading.RLock()
        self._keys: dict[tuple[str, str], Job] = {}  # /proc/PID/cgroup entry -> job
        self._adopted: set[int] = set()  # owner's children we must reap (CLONE_PARENT)
        self._unreaped: set[int] = set()
        self._owner = os.getpid()
        self._wd: dict[int, Job] = {}
        self._efd: dict[int, Job] = {}
        self._stop = False
        self._state = threading.Lock()  # _exited / _close_on_exit: who closes the fds
        self._exited = False
        self._close_on_exit = False
        self._closed = False
        self._procs = ProcEvents()
        self._lost_seen = 0
        try:
            self._inotify = Inotify()
            try:
                self._sel = selectors.DefaultSelector()
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._sel.register(self._procs.fd, selectors.EVENT_READ, "procs")
                self._sel.register(self._inotify.fd, selectors.EVENT_READ, "inotify")
                self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            except BaseException:
                self._inotify.close()
                raise
        except BaseException:
            self._procs.close()
            raise
        self._thread = threading.Thread(target=self._run, name=f"job-{root.name}", daemon=True)
        self._thread.start()
        _MONITORS.add(self)

    # ---- registration (under the lock) -----------------------------------------------

    def watch(self, job: Job) -> None:
        w = job.cgroup.watches()
        with self._lock:
            self.jobs[job.cgroup.rel] = job
            for key in job.cgroup.proc_keys():
                self._keys[key] = job
            for f in w.files:
                if os.path.exists(f):
                    self._wd[self._inotify.add_watch(f)] = job
            for fd in w.eventfds:
                self._efd[fd] = job
                self._sel.register(fd, selectors.EVENT_READ, ("eventfd", job))

    def unwatch(self, job: Job) -> None:
        with self._lock:
            for fd, j in list(self._efd.items()):
                if j is job:
                    with contextlib.suppress(KeyError, ValueError):
                        self._sel.unregister(fd)
                    del self._efd[fd]
            for wd, j in list(self._wd.items()):
                if j is job:
                    del self._wd[wd]
                    with contextlib.suppress(IsoboxError):
                        self._inotify.rm_watch(wd)
            for key, j in list(self._keys.items()):
                if j is job:
                    del self._keys[key]
            for pid, j in list(self.members.items()):
                if j is job:  # after terminate: only exits we have not read yet
                    del self.members[pid]
            if self.jobs.get(job.cgroup.rel) is job:
                del self.jobs[job.cgroup.rel]

    # ---- membership --------------------------------------------------------------------

    def track(self, pid: int, job: Job, *, moved: bool = False) -> None:
        """``pid`` is in ``job`` now. ``moved``: the same live process was (maybe) counted
        by another job of this tree, so its count moves; otherwise an entry left for this
        pid is stale (an exit we never saw) and counts as ended."""
        with self._lock:
            prev = self.members.get(pid)
            if prev is job:
                return
            if prev is not None:
                if moved:
                    prev.total_processes -= 1
                else:
                    prev.terminated_processes += 1
            self.members[pid] = job
            job.total_processes += 1

    def release(self, pid: int) -> None:
        """``pid`` was moved into another tree's job: it is no longer counted here."""
        with self._lock:
            self.flush_procs()
            job = self.members.pop(pid, None)
            if job is not None:
                job.total_processes -= 1
            self._adopted.discard(pid)

    def _job_of(self, pid: int) -> Job | None:
        """The job of this tree whose cgroup holds ``pid``, from ``/proc`` (a v1 zombie
        shows the root cgroup there; its ``/proc/PID/cpuset`` still names its cpuset)."""
        try:
            with open(f"/proc/{pid}/cgroup") as fh:
                lines = fh.read().splitlines()
        except OSError:
            return None
        for line in lines:
            _id, ctrls, path = line.split(":", 2)
            path = path.removesuffix(" (deleted)")
            for ctrl in ctrls.split(",") if ctrls else [""]:
                job = self._keys.get((ctrl, path))
                if job is not None:
                    return job
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cpuset") as fh:
            return self._keys.get(("cpuset", fh.read().strip()))
        return None

    def flush_procs(self) -> None:
        """Handle every process event queued now."""
        with self._lock:
            self._handle_procs()

    def _handle_procs(self) -> None:
        for ev in self._procs.read():
            try:  # events already read are gone from the socket: one failure loses one
                self._handle_event(ev)
            except Exception:
                log.exception("job monitor %s: handling %s", self.root.name, ev)
        if self._procs.lost != self._lost_seen:
            log.warning("job monitor %s: the kernel dropped process events; reconciling",
                        self.root.name)
            self._lost_seen = self._procs.lost
            self._reconcile(prune=True)
        self._reap()

    def _handle_event(self, ev: Fork | Exit) -> None:
        if isinstance(ev, Fork):
            if ev.child_pid != ev.child_tgid:
                return  # a thread
            job = self.members.get(ev.parent_tgid)
            if job is not None:
                self.track(ev.child_pid, job)
            elif ev.parent_tgid == self._owner and ev.child_pid not in self.members:
                # The owner's child: one of its own, or a member's CLONE_PARENT child.
                job = self._job_of(ev.child_pid)
                if job is not None:
                    self.track(ev.child_pid, job)
                    self._adopted.add(ev.child_pid)
        elif ev.pid == ev.tgid:
            if ev.pid in self._adopted:
                self._adopted.discard(ev.pid)
                self._unreaped.add(ev.pid)
            job = self.members.pop(ev.pid, None)
            if job is None:
                return
            job.terminated_processes += 1
            if os.WIFSIGNALED(ev.status) and os.WTERMSIG(ev.status) == signal.SIGKILL:
                self._attribute_oom(job, ev.pid)

    def _reap(self) -> None:
        """Reap the exited CLONE_PARENT children of the owner (zombies otherwise)."""
        for pid in list(self._unreaped):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # reaped by someone else
            if done:
                self._unreaped.discard(pid)

    def _reconcile(self, *, prune: bool) -> None:
        """Track every process found in a job's cgroup that is not tracked (CLONE_PARENT
        children of a parent outside the job, processes moved in by others); with
        ``prune``, count members no longer in their job as ended (their exit was lost)."""
        seen: dict[int, Job] = {}
        for job in list(self.jobs.values()):  # parents first: a nested job overrides
            if job.closed:
                continue
            with contextlib.suppress(IsoboxError, OSError, ValueError):
                for pid in job.cgroup.own_pids():
                    seen[pid] = job
        for pid, job in seen.items():
            prev = self.members.get(pid)
            if prev is None:
                self.track(pid, job)
            elif prev is not job and not prev.closed:
                self.track(pid, job, moved=True)  # moved by someone else
        if prune:
            for pid, job in list(self.members.items()):
                if pid not in seen:
                    del self.members[pid]
                    job.terminated_processes += 1
                    if pid in self._adopted:
                        self._adopted.discard(pid)
                        self._unreaped.add(pid)

    def drain(self) -> None:
        """Handle every event the kernel has queued up to now (called by readers)."""
        with self._lock:
            self._handle_procs()
            self._reconcile(prune=False)
            for job in list(self.jobs.values()):
                job._check_counters()

    # ---- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + self.TICK
        try:
            while not self._stop:
                timeout = max(0.0, next_tick - time.monotonic())
                try:
                    ready = self._sel.select(timeout)
                except (OSError, ValueError):
                    if self._stop:
                        break
                    log.exception("job monitor %s: select failed", self.root.name)
                    time.sleep(0.1)
                    continue
                with self._lock:
                    if self._stop:
                        break
                    for key, _ in ready:
                        try:
                            self._handle(key)
                        except Exception:
                            log.exception("job monitor %s: handling %s", self.root.name,
                                          key.data)
                    if time.monotonic() >= next_tick:
                        next_tick = time.monotonic() + self.TICK
                        try:
                            self._tick()
                        except Exception:
                            log.exception("job monitor %s: tick", self.root.name)
        finally:
            with self._state:
                self._exited = True
                close = self._close_on_exit
            if close:
                self._close()

    def _handle(self, key: selectors.SelectorKey) -> None:
        if key.data == "procs":
            self._handle_procs()
        elif key.data == "inotify":
            for wd in self._inotify.read():
                job = self._wd.get(wd)
                if job is not None:
                    job._check_counters()
        elif key.data == "wake":
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 64)
        elif isinstance(key.data, tuple) and key.data[0] == "eventfd":
            # The select ran without the lock: the job may have been closed since (its
            # eventfd unregistered, closed, the number maybe reused). Only a descriptor
            # still registered for this very job is read.
            owner: Job = key.data[1]
            if self._efd.get(key.fd) is not owner:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(key.fd)
            owner._check_counters()

    def _tick(self) -> None:
        self._handle_procs()
        self._reconcile(prune=False)
        for job in list(self.jobs.values()):
            job._check_counters()
            # An OOM kill whose exit was not seen within a tick: report it without a pid
            # rather than not at all.
            if job._pending_oom and job._pending_aged:
                self._attribute_oom(job, None)
            job._pending_aged = job._pending_oom > 0

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
        """Stop the thread and close its descriptors. From the thread itself (a callback
        that closes the job), the thread closes them when its loop returns."""
        self._stop = True
        _MONITORS.discard(self)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        with self._state:
            if not self._exited:  # this thread, or one stuck in a callback: it closes
                self._close_on_exit = True
                return
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._reap()
            self._sel.close()
            self._procs.close()
            self._inotify.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
