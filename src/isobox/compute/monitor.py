"""The per-container monitor: one single-threaded process that owns a running container.

Started by the spawner's zygote (double fork + setsid, so it outlives ``isoboxd``), it:

1. mounts the overlay root at ``plan.rootfs``, creates the container through its backend
   (:mod:`isobox.compute.backends`) — the process waits — and listens on ``monitor.sock``
   (0600); then reports readiness (or the error, after undoing what it made) on a pipe;
2. runs one ``selectors`` loop: the process's output (pipes, or a pty master) goes to
   ``log.jsonl`` and to attached streams; stdin frames go to the process; requests on the
   socket are served (the ops below); SIGCHLD (it is a child subreaper, so the container's
   init and every exec'd process are reaped here) ends processes; the container's cgroup
   events (OOM kills, the pids limit) go to subscribers;
3. when the container's process ends: drains its output, writes ``status.json``
   atomically, sends ``{"exit": ...}`` to every stream and subscriber, releases what it
   made in reverse order (silo or job and its cgroup, the root mount, the socket and run
   folder) and exits. Its exit means everything is released.

Protocol on ``monitor.sock``: each connection starts with a control frame
``{"v": 1, "op": OP, ...}`` (frames of :mod:`isobox.spec.stream`), answered with
``{"ok": true, ...}`` or ``{"error": {"kind", "message"}}``:

* ``status`` → ``state`` (created/running/paused/stopped), ``pid``, ``exit`` (status or null)
* ``start`` → ``pid``;  ``signal`` (``signal``, ``all``);  ``pause``;  ``resume``
* ``stats`` → ``stats`` (a ``StatsSample``);  ``top`` → ``processes`` (``ProcessEntry``\\ s)
* ``attach`` (``stdin stdout stderr``) and ``exec`` (``process``: an ``ExecSpec``): the
  connection becomes a stream: output frames, stdin / ``resize`` / ``closeStdin`` from the
  peer, ``{"exit": {"exitCode", "signal"}}`` last. With ``"handoff": true`` the request
  carries one descriptor (SCM_RIGHTS) and the stream is spoken on it instead; the request's
  connection is closed after the reply, so a stream handed over by the daemon survives it.
* ``subscribe``: ``{"event": {"action", "attributes"}}`` frames, then ``{"exit": status}``.

Nothing here blocks for long: the only waits are the silo's own set-up calls (create, start,
exec's join, tens of milliseconds).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import termios
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isobox import errors
from isobox.compute.backends import Backend, ChildIO, make_backend
from isobox.compute.logfile import LogWriter, now_ts
from isobox.compute.plan import Plan, read_plan
from isobox.errors import Conflict, InvalidArgument, IsoboxError, NotFound
from isobox.paths import socket_name
from isobox.silo.procinfo import process_entry
from isobox.spec import stream as S

READ_SIZE = 65536
MAX_OUT_BUFFER = 8 << 20  # a stream that falls this far behind is dropped
PARTIAL_DELAY = 0.05  # a partial line is logged after the process paused writing this long
DRAIN_TIMEOUT = 1.0  # after an exit, output still open (held by a background child) waits
FLUSH_TIMEOUT = 2.0  # after the end, streams get this long to take their last frames
TICK = 1.0


def wire_error(exc: BaseException) -> dict[str, str]:
    """``{"kind", "message"}``: the kind is the nearest class of :mod:`isobox.errors`."""
    kind = "IsoboxError"
    for cls in type(exc).__mro__:
        if getattr(errors, cls.__name__, None) is cls and issubclass(cls, IsoboxError):
            kind = cls.__name__
            break
    return {"kind": kind, "message": str(exc) or type(exc).__name__}


def error_from_wire(detail: dict[str, Any]) -> IsoboxError:
    """The :class:`IsoboxError` a peer reported, same class and message."""
    kind, message = str(detail.get("kind", "")), str(detail.get("message", ""))
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, IsoboxError)):
        cls = IsoboxError
    if cls.__init__ in (IsoboxError.__init__, Exception.__init__) or cls is errors.InvalidDocument:
        return cls(message)
    exc = cls.__new__(cls)  # classes whose constructor takes parts (SystemError_, ...)
    Exception.__init__(exc, message)
    return exc


def exit_status(status: int) -> tuple[int, int | None]:
    """(exitCode, signal) of a wait status; 128+signal when killed by one."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.waitstatus_to_exitcode(status), None


def write_json_atomic(path: Path, data: dict[str, Any], *, sync: bool = True) -> None:
    """Complete or not at all; on disk before returning unless ``sync`` is False (then
    :func:`sync_file` later)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(data))
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def sync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Proc:
    """A process whose stdio the monitor holds: the container's, or an exec's."""

    pid: int
    outputs: dict[int, str] = field(default_factory=dict)  # fd -> "stdout" | "stderr"
    stdin: int | None = None  # where stdin frames go (a pipe's write end or the master)
    master: int | None = None
    log: LogWriter | None = None
    streams: list[Conn] = field(default_factory=list)
    stdin_buf: bytearray = field(default_factory=bytearray)
    stdin_closing: bool = False
    status: int | None = None
    exited_at: float = 0.0
    partial_at: dict[str, float] = field(default_factory=dict)
    main: bool = False
    finished: bool = False


@dataclass
class Conn:
    sock: socket.socket
    reader: S.FrameReader = field(default_factory=S.FrameReader)
    out: bytearray = field(default_factory=bytearray)
    mode: str = "request"  # request | stream | subscribe | done
    proc: Proc | None = None
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    closing: bool = False  # close once ``out`` is written

    @property
    def fd(self) -> int:
        return self.sock.fileno()


class Monitor:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.backend: Backend = make_backend(plan)
        self.sel = selectors.DefaultSelector()
        self._handlers: dict[int, list[Callable[[], None] | None]] = {}
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self.conns: dict[int, Conn] = {}
        self.subscribers: list[Conn] = []
        self.procs: dict[int, Proc] = {}
        self.main: Proc | None = None
        self.state = "created"
        self.started_at: str | None = None
        self.exit: dict[str, Any] | None = None
        self.error: str | None = None  # why the run failed, when it did
        self.done = False
        self.end_deadline = 0.0
        self._wake_r = self._wake_w = -1
        self._listener: socket.socket | None = None
        self._cg_counters: Any = None
        self._cg: Any = None
        self._next_tick = time.monotonic() + TICK
        self._signal_pending: list[int] = []
        self._child_ends: list[int] = []

    # ---- descriptors in the loop ---------------------------------------------------------

    def _watch(self, fd: int, read: Callable[[], None] | None = None,
               write: Callable[[], None] | None = None, *, keep: bool = False) -> None:
        """Set (or, with ``keep``, add to) the handlers of ``fd``; none left: unregister."""
        old = self._handlers.get(fd, [None, None])
        new = [read or (old[0] if keep else None), write or (old[1] if keep else None)]
        mask = (selectors.EVENT_READ if new[0] else 0) | (selectors.EVENT_WRITE if new[1]
                                                          else 0)
        if fd in self._handlers:
            if mask:
                self.sel.modify(fd, mask)
            else:
                self.sel.unregister(fd)
        elif mask:
            self.sel.register(fd, mask)
        if mask:
            self._handlers[fd] = new
        else:
            self._handlers.pop(fd, None)

    def _unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)

    def _unwatch_write(self, fd: int) -> None:
        old = self._handlers.get(fd)
        if old is not None and old[1] is not None:
            self._watch(fd, old[0], None)

    # ---- set-up ------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything up to a waiting process and a listening socket; on failure what was
        made is undone and the error raised."""
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise

    def _setup(self) -> None:
        from isobox._sys import linux as L
        from isobox.silo.image_root import is_mounted, mount_image_root, unmount_image_root
        from isobox.storage.store import Mounts

        plan = self.plan
        L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._undo.append(("wake pipe", self._close_wake))
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in range(1, signal.NSIG):  # inherited ignores would reach host processes
            with contextlib.suppress(OSError, ValueError):
                if sig != signal.SIGPIPE and signal.getsignal(sig) == signal.SIG_IGN:
                    signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        self._watch(self._wake_r, self._on_wake)

        run_dir = Path(plan.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._undo.append(("run folder", lambda: shutil.rmtree(run_dir, ignore_errors=True)))
        plan.status_path.unlink(missing_ok=True)  # of a previous run

        rootfs = Path(plan.rootfs)
        if is_mounted(rootfs):  # a monitor killed -9 left it
            unmount_image_root(rootfs)
        mounts = Mounts([Path(p) for p in plan.lower], Path(plan.upper), Path(plan.work))
        for p in mounts.lower:
            if not p.is_dir():
                raise NotFound(f"container {plan.id}: image layer {p} is missing")
        if plan.isolation != "vm":  # a utility VM mounts its root itself, from disks
            mount_image_root(mounts, rootfs)
            self._undo.append(("root mount", lambda: unmount_image_root(rootfs)))

        log = LogWriter(plan.log_path)
        self._undo.append(("log", log.close))
        main, io, child_ends = self._stdio(plan.tty, plan.stdin, log)
        self.main = main
        self._undo.append(("stdio", lambda: self._close_proc_fds(main)))
        # Host isolation spawns at start: the child's ends stay open until then.
        self._child_ends = child_ends
        self._undo.append(("container", self.backend.release))
        master = self.backend.create(io)
        if master is not None:
            main.master = master
            main.outputs[master] = "stdout"
            main.stdin = master if plan.stdin else None
        main.pid = self.backend.pid
        main.main = True
        events_fd = getattr(self.backend, "events_fd", None)
        if events_fd is not None:
            # A backend whose processes are no children of this one (vm): their exits
            # arrive on this descriptor instead of SIGCHLD.
            self._watch(events_fd(), self._backend_exits)
        else:
            self._watch_cgroup()
        sock_path = plan.socket_path
        sock_path.unlink(missing_ok=True)
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            with socket_name(sock_path) as name:
                lst.bind(name)
        finally:
            os.umask(old)
        os.chmod(sock_path, 0o600)
        lst.listen(64)
        lst.setblocking(False)
        self._listener = lst
        self._undo.append(("socket", self._close_listener))
        self._watch(lst.fileno(), self._accept)

    def _stdio(self, tty: bool, stdin: bool, log: LogWriter | None
               ) -> tuple[Proc, ChildIO, list[int]]:
        """Pipes for a process (none with a tty: the backend returns a master)."""
        proc = Proc(pid=0, log=log)
        io = ChildIO(tty=tty)
        ends: list[int] = []
        if tty:
            return proc, io, ends
        try:
            for name in ("stdout", "stderr"):
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(r, False)
                proc.outputs[r] = name
                ends.append(w)
                setattr(io, name, w)
            if stdin:
                r, w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(w, False)
                proc.stdin = w
                ends.append(r)
                io.stdin = r
        except BaseException:
            self._close_proc_fds(proc)
            for fd in ends:
                os.close(fd)
            raise
        return proc, io, ends

    def _close_child_ends(self) -> None:
        for fd in self._child_ends:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._child_ends = []

    def _close_proc_fds(self, proc: Proc) -> None:
        for fd in list(proc.outputs):
            self._unwatch(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        proc.outputs.clear()
        if proc.stdin is not None and proc.stdin != proc.master:
            self._unwatch(proc.stdin)
            with contextlib.suppress(OSError):
                os.close(proc.stdin)
        proc.stdin = None
        if proc.master is not None:
            self._unwatch(proc.master)
            with contextlib.suppress(OSError):
                os.close(proc.master)
            proc.master = None

    def _close_wake(self) -> None:
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            self._unwatch(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._unwatch(self._listener.fileno())
            self._listener.close()
            self._listener = None
        self.plan.socket_path.unlink(missing_ok=True)

    def _watch_cgroup(self) -> None:
        """OOM kills (v1: the OOM eventfd, at once) and the pids and memory limits' failures
        (read at each tick, and once more before the exit is sent).

        No inotify watch of ``pids.events``: closing an inotify descriptor waits for an SRCU
        grace period (~13 ms here), on every container's exit path; a limit event within a
        tick is soon enough."""
        from isobox.jobs.cgroup import Counters

        try:
            cg = self.backend.cgroup()
            self._cg = cg
            # The backend made the cgroup just now: every counter starts at 0 (no read of
            # a dozen files on the way to the start).
            self._cg_counters = Counters()
            w = cg.watches()
        except (IsoboxError, OSError) as exc:
            print(f"monitor: cgroup events unavailable: {exc}", file=sys.stderr)
            return
        efds = list(w.eventfds)

        def close() -> None:
            for fd in efds:
                self._unwatch(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._undo.append(("cgroup events", close))
        for fd in efds:
            def on_eventfd(fd: int = fd) -> None:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.eventfd_read(fd)
                self._check_counters()
            self._watch(fd, on_eventfd)

    def _check_counters(self) -> None:
        if self._cg is None or self._cg_counters is None:
            return
        try:
            now = self._cg.read()
        except (IsoboxError, OSError):
            return
        last, self._cg_counters = self._cg_counters, now
        if now.oom_kills > last.oom_kills:
            self._event("oom", {"count": str(now.oom_kills - last.oom_kills)})
        if now.pids_limit_hits > last.pids_limit_hits:
            self._event("limit", {"limit": "pids",
                                  "count": str(now.pids_limit_hits - last.pids_limit_hits)})
        if now.memory_limit_hits > last.memory_limit_hits:
            self._event("limit", {"limit": "memory",
                                  "count": str(now.memory_limit_hits - last.memory_limit_hits)})

    def _event(self, action: str, attributes: dict[str, str]) -> None:
        for conn in self.subscribers:
            self._send(conn, S.encode_control({"event": {"action": action,
                                                         "attributes": attributes}}))

    # ---- signals and children ------------------------------------------------------------

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self._signal_pending.append(signum)

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _handle_stop_signals(self) -> None:
        """SIGTERM/SIGINT/SIGHUP to the monitor: the container is killed and the monitor
        ends the normal way (status written, everything released)."""
        while self._signal_pending:
            sig = self._signal_pending.pop()
            print(f"monitor: signal {sig}: killing the container", file=sys.stderr)
            self._kill(signal.SIGKILL, all_processes=True)

    def _kill(self, sig: int, *, all_processes: bool) -> None:
        if self.state == "stopped":
            return
        if self.state == "created" and not self.backend.pid:
            # Nothing runs yet (host isolation spawns at start): the kill ends it as such.
            self._main_exited((sig & 0x7F) if sig else signal.SIGKILL)
            return
        self.backend.signal(sig, all_processes)
        if self.state == "paused" and sig == signal.SIGKILL:
            self.backend.resume()  # a frozen process takes the SIGKILL when thawed
            self.state = "running"

    def _backend_exits(self) -> None:
        for pid, status in self.backend.take_exits():  # type: ignore[attr-defined]
            self._ended(pid, status)

    def _ended(self, pid: int, status: int) -> None:
        proc = self.procs.get(pid)
        if proc is None and self.main is not None and pid == self.main.pid:
            proc = self.main
        if proc is None:
            return
        if proc.main:
            why = getattr(self.backend, "error", None)
            if why and self.error is None:
                self.error = str(why)
            self._main_exited(status)
        else:
            proc.status = status
            proc.exited_at = time.monotonic()
            self._drain(proc)

    def _reap(self) -> None:
        if not getattr(self.backend, "reaps_children", True):
            return  # vm: QEMU is a child, reaped by its own watcher
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.get(pid)
            if proc is None and self.main is not None and pid == self.main.pid:
                proc = self.main
            self.backend.reaped(pid, status)
            if proc is None:
                continue  # an orphan of the container, or a helper
            if proc.main:
                self._main_exited(status)
            else:
                proc.status = status
                proc.exited_at = time.monotonic()
                self._drain(proc)

    def _main_exited(self, status: int) -> None:
        main = self.main
        assert main is not None
        if main.status is not None:
            return
        main.status = status
        main.exited_at = time.monotonic()
        self.state = "stopped"
        self._drain(main)

    # ---- output --------------------------------------------------------------------------

    def _register_proc(self, proc: Proc) -> None:
        for fd in proc.outputs:
            self._watch(fd, functools.partial(self._on_output, proc, fd), keep=True)

    def _on_output(self, proc: Proc, fd: int) -> None:
        stream = proc.outputs.get(fd)
        if stream is None:
            return
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's last slave closed
                raise
            data = b""
        if not data:
            self._output_closed(proc, fd)
            return
        if proc.log is not None:
            proc.log.write(stream, data)
            if proc.log.pending(stream):
                proc.partial_at[stream] = time.monotonic() + PARTIAL_DELAY
        kind = S.STDOUT if stream == "stdout" else S.STDERR
        for i in range(0, len(data), S.MAX_PAYLOAD):
            frame = S.encode(kind, data[i:i + S.MAX_PAYLOAD])
            for conn in list(proc.streams):
                if conn.stdout if kind == S.STDOUT else conn.stderr:
                    self._send(conn, frame)

    def _output_closed(self, proc: Proc, fd: int) -> None:
        stream = proc.outputs.pop(fd, "stdout")
        if fd == proc.master:
            self._unwatch(fd)  # the master stays open for stdin and resize until the end
        else:
            self._unwatch(fd)
            os.close(fd)
        if proc.log is not None:
            proc.log.flush_partial(stream, final=True)
            proc.partial_at.pop(stream, None)
        if proc.status is not None and not proc.outputs:
            self._finish(proc)

    def _drain(self, proc: Proc) -> None:
        """The process ended: take what its output still holds (the rest within
        DRAIN_TIMEOUT: a background child may keep a pipe open)."""
        for fd in list(proc.outputs):
            for _ in range(1024):  # bounded: a background child may write on and on
                if fd not in proc.outputs or not self._readable(fd):
                    break
                self._on_output(proc, fd)
        if not proc.outputs:
            self._finish(proc)

    @staticmethod
    def _readable(fd: int) -> bool:
        import select

        try:
            r, _, _ = select.select([fd], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(r)

    def _finish(self, proc: Proc) -> None:
        if proc.finished or proc.status is None:
            return
        proc.finished = True
        for fd in list(proc.outputs):
            self._output_closed(proc, fd)
        code, sig = exit_status(proc.status)
        result = {"exitCode": code, "signal": sig}
        if proc.main:
            self._write_status(code, sig)
        for conn in list(proc.streams):
            self._send(conn, S.encode_control({"exit": result}))
            conn.closing = True
            self._flush(conn)
        proc.streams.clear()
        self._close_proc_fds(proc)
        self.procs.pop(proc.pid, None)
        if proc.main:
            self._check_counters()  # events not yet read come before the exit
            for conn in list(self.subscribers):
                self._send(conn, S.encode_control({"exit": self.exit}))
                conn.closing = True
                self._flush(conn)
            self.subscribers.clear()
            sync_file(self.plan.status_path)
            self.done = True
            self.end_deadline = time.monotonic() + FLUSH_TIMEOUT

    def _write_status(self, code: int, sig: int | None) -> None:
        main = self.main
        if main is not None and main.log is not None:
            main.log.close()
        self.exit = {"version": 1, "exitCode": code, "signal": sig, "error": self.error,
                     "startedAt": self.started_at, "finishedAt": now_ts()}
        # Visible to every reader now; made durable just after the exit is sent (the
        # disk flush is not on the way of whoever waits for the exit code).
        write_json_atomic(self.plan.status_path, self.exit, sync=False)

    def _timers(self) -> float:
        """Run what is due; the time until the next thing is due."""
        now = time.monotonic()
        nxt = self._next_tick
        procs = [p for p in [self.main, *self.procs.values()] if p is not None]
        for proc in procs:
            for stream, when in list(proc.partial_at.items()):
                if when <= now:
                    proc.partial_at.pop(stream)
                    if proc.log is not None:
                        proc.log.flush_partial(stream)
                else:
                    nxt = min(nxt, when)
            if proc.status is not None and not proc.finished:
                if now >= proc.exited_at + DRAIN_TIMEOUT:
                    self._finish(proc)
                else:
                    nxt = min(nxt, proc.exited_at + DRAIN_TIMEOUT)
        if now >= self._next_tick:
            self._next_tick = now + TICK
            if self.subscribers and self.state in ("running", "paused"):
                self._check_counters()
        return max(0.0, nxt - now)

    # ---- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            conn = Conn(sock)
            self.conns[conn.fd] = conn
            self._watch(conn.fd, functools.partial(self._on_readable, conn))

    def _send(self, conn: Conn, data: bytes) -> None:
        if conn.mode == "done":
            return
        conn.out += data
        if len(conn.out) > MAX_OUT_BUFFER:
            print("monitor: dropping a stream that does not read", file=sys.stderr)
            self._close(conn)
            return
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        if conn.mode == "done":
            return
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                self._watch(conn.fd, write=functools.partial(self._flush, conn), keep=True)
                return
            except OSError:
                self._close(conn)
                return
            del conn.out[:n]
        self._unwatch_write(conn.fd)
        if conn.closing:
            self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn.mode == "done":
            return
        conn.mode = "done"
        self._unwatch(conn.fd)
        self.conns.pop(conn.fd, None)
        if conn.proc is not None and conn in conn.proc.streams:
            conn.proc.streams.remove(conn)
        if conn in self.subscribers:
            self.subscribers.remove(conn)
        conn.sock.close()

    def _on_readable(self, conn: Conn) -> None:
        fds: list[int] = []
        try:
            if conn.mode == "request":
                data, fds, _flags, _addr = socket.recv_fds(conn.sock, READ_SIZE, 1)
            else:
                data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            for fd in fds:
                os.close(fd)
            if conn.mode == "stream" and conn.proc is not None and not conn.proc.finished:
                # The peer is done sending (a half-close after its stdin ended): it still
                # takes the output and the exit. A peer that is gone fails the next send.
                old = self._handlers.get(conn.fd)
                self._watch(conn.fd, None, old[1] if old else None)
                return
            self._close(conn)
            return
        try:
            frames = conn.reader.feed(data)
        except S.StreamError as exc:
            for fd in fds:
                os.close(fd)
            self._reply_error(conn, InvalidArgument(f"bad frame: {exc}"))
            return
        self._frames(conn, frames, fds)

    def _frames(self, conn: Conn, frames: list[tuple[int, bytes]], fds: list[int]) -> None:
        for i, (kind, payload) in enumerate(frames):
            if conn.mode == "request":
                try:
                    if kind != S.CONTROL:
                        raise InvalidArgument("the first frame must be a control request")
                    req = S.decode_control(payload)
                    target = self._request(conn, req, fds)
                    fds = []
                except S.StreamError as exc:
                    self._reply_error(conn, InvalidArgument(str(exc)))
                    return
                except IsoboxError as exc:
                    self._reply_error(conn, exc)
                    return
                except Exception as exc:  # a bug must not end the container's monitor
                    traceback.print_exc()
                    self._reply_error(conn, IsoboxError(f"monitor: {exc}"))
                    return
                finally:
                    for fd in fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    fds = []
                if target is not None and target is not conn:
                    # Handed over: later frames arrive on the new descriptor.
                    return
                if conn.mode == "done":
                    return
                if target is None and conn.mode == "request":
                    return
                rest = frames[i + 1:]
                if rest:
                    self._frames(conn, rest, [])
                return
            if conn.mode == "stream":
                self._stream_frame(conn, kind, payload)
            # subscribe: frames from the peer are ignored

    def _reply_error(self, conn: Conn, exc: BaseException) -> None:
        self._send(conn, S.encode_control({"error": wire_error(exc)}))
        conn.closing = True
        self._flush(conn)

    def _reply(self, conn: Conn, body: dict[str, Any], *, close: bool = True) -> None:
        self._send(conn, S.encode_control({"ok": True, **body}))
        if close:
            conn.closing = True
            self._flush(conn)

    # ---- ops -----------------------------------------------------------------------------

    def _request(self, conn: Conn, req: dict[str, Any], fds: list[int]) -> Conn | None:
        """Serve one request. Returns the connection that carries a stream (``conn`` or a
        handed-over one), or None."""
        if req.get("v") != 1:
            raise InvalidArgument(f"monitor protocol version {req.get('v')!r} (this speaks 1)")
        op = req.get("op")
        handoff = bool(req.get("handoff"))
        if handoff and (op not in ("attach", "exec") or len(fds) != 1):
            raise InvalidArgument("handoff needs an attach or exec request with one "
                                  "descriptor")
        if op == "status":
            self._reply(conn, {"state": self.state, "pid": self.backend.pid,
                               "exit": self.exit, "startedAt": self.started_at})
            return None
        if op == "subscribe":
            if self.exit is not None:
                self._send(conn, S.encode_control({"ok": True}))
                self._send(conn, S.encode_control({"exit": self.exit}))
                conn.closing = True
                self._flush(conn)
                return None
            self._send(conn, S.encode_control({"ok": True}))
            conn.mode = "subscribe"
            self.subscribers.append(conn)
            return conn
        if self.done or self.state == "stopped":
            raise Conflict(f"container {self.plan.id} is stopped")
        if op == "start":
            self._reply(conn, {"pid": self._start()})
        elif op == "signal":
            sig = req.get("signal", signal.SIGKILL)
            if not isinstance(sig, int) or not 0 <= sig < 65:
                raise InvalidArgument(f"invalid signal {sig!r}")
            self._kill(sig, all_processes=bool(req.get("all")))
            self._reply(conn, {})
        elif op == "pause":
            if self.state != "running":
                raise Conflict(f"container {self.plan.id} is {self.state}, not running")
            self.backend.pause()
            self.state = "paused"
            self._reply(conn, {})
        elif op == "resume":
            if self.state != "paused":
                raise Conflict(f"container {self.plan.id} is {self.state}, not paused")
            self.backend.resume()
            self.state = "running"
            self._reply(conn, {})
        elif op == "stats":
            self._reply(conn, {"stats": self._stats()})
        elif op == "top":
            self._reply(conn, {"processes": self._top()})
        elif op in ("attach", "exec"):
            proc = self.main if op == "attach" else self._exec(req.get("process"))
            assert proc is not None
            target = conn
            if handoff:
                target = self._adopt(fds[0])
                fds.clear()
            if op == "attach":
                target.stdin = bool(req.get("stdin"))
                target.stdout = bool(req.get("stdout", True))
                target.stderr = bool(req.get("stderr", True))
            else:
                target.stdin = target.stdout = target.stderr = True
            target.mode, target.proc = "stream", proc
            proc.streams.append(target)
            body = {"pid": proc.pid} if op == "exec" else {}
            self._reply(conn, body, close=handoff)
            if proc.finished or (proc.status is not None and not proc.outputs):
                self._finish(proc)
            return target
        else:
            raise InvalidArgument(f"unknown monitor op {op!r}")
        return None

    def _adopt(self, fd: int) -> Conn:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        conn = Conn(sock, mode="stream")
        self.conns[conn.fd] = conn
        self._watch(conn.fd, functools.partial(self._on_readable, conn))
        return conn

    def _start(self) -> int:
        if self.state != "created":
            raise Conflict(f"container {self.plan.id} is {self.state}, not created")
        main = self.main
        assert main is not None
        try:
            pid = self.backend.start()
        except BaseException as exc:
            # The run failed: record why, and end as any run ends.
            self.error = f"starting the process: {exc}"
            self._close_child_ends()
            main.pid = self.backend.pid or -1
            self._main_exited(127 << 8)
            raise
        self._close_child_ends()
        main.pid = pid
        self.started_at = now_ts()
        self.state = "running"
        return pid

    def _exec(self, raw: Any) -> Proc:
        from isobox.spec.compute import ExecSpec, parse_model

        if self.state != "running":
            raise Conflict(f"container {self.plan.id} is {self.state}, not running")
        if not isinstance(raw, dict):
            raise InvalidArgument("exec: process is required")
        spec = parse_model(ExecSpec, raw, "exec").model_dump()
        proc, io, ends = self._stdio(spec["tty"], spec["stdin"], None)
        try:
            pid, master = self.backend.exec(spec, io)
        except BaseException:
            self._close_proc_fds(proc)
            raise
        finally:
            for fd in ends:
                os.close(fd)
        proc.pid = pid
        if master is not None:
            proc.master = master
            proc.outputs[master] = "stdout"
            proc.stdin = master if spec["stdin"] else None
        self.procs[pid] = proc
        self._register_proc(proc)
        return proc

    def _stream_frame(self, conn: Conn, kind: int, payload: bytes) -> None:
        proc = conn.proc
        if proc is None:
            return
        if kind == S.STDIN:
            if conn.stdin and proc.stdin is not None and not proc.stdin_closing:
                proc.stdin_buf += payload
                self._write_stdin(proc)
        elif kind == S.CONTROL:
            try:
                msg = S.decode_control(payload)
            except S.StreamError:
                return
            if "resize" in msg and proc.master is not None:
                with contextlib.suppress(ValueError, TypeError, OSError):
                    rows, cols = (int(x) for x in msg["resize"])
                    fcntl.ioctl(proc.master, termios.TIOCSWINSZ,
                                struct.pack("HHHH", rows, cols, 0, 0))
            if msg.get("closeStdin") and conn.stdin and proc.stdin is not None:
                proc.stdin_closing = True
                self._write_stdin(proc)

    def _write_stdin(self, proc: Proc) -> None:
        fd = proc.stdin
        if fd is None:
            proc.stdin_buf.clear()
            return
        while proc.stdin_buf:
            try:
                n = os.write(fd, proc.stdin_buf)
            except (BlockingIOError, InterruptedError):
                self._watch(fd, write=lambda: self._write_stdin(proc), keep=True)
                return
            except OSError:  # the process closed its stdin
                proc.stdin_buf.clear()
                break
            del proc.stdin_buf[:n]
        if fd in self._handlers:
            self._unwatch_write(fd)
        if proc.stdin_closing:
            if fd == proc.master:
                with contextlib.suppress(OSError):
                    os.write(fd, b"\x04")  # end of file on a terminal is ^D
            else:
                self._unwatch(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
            proc.stdin = None

    # ---- stats and top -------------------------------------------------------------------

    def _limit(self, oci_key: str, host_key: str) -> int | None:
        if self.plan.isolation == "host":
            v = self.plan.limits.get(host_key)
            return int(v) if v is not None else None
        res = self.plan.oci.get("linux", {}).get("resources", {})
        if self.plan.isolation == "vm":
            res = self.plan.vm.get("oci", {}).get("resources", {})
        v = res.get(oci_key, {}).get("limit")
        return int(v) if v else None

    def _stats(self) -> dict[str, Any]:
        own = getattr(self.backend, "stats", None)
        if own is not None:  # vm: the guest's cgroup, through the agent
            g: dict[str, Any] = own()
            return {
                "read": now_ts(), "cpuUsageNs": int(g.get("cpuUsageNs") or 0),
                "cpuPercent": 0.0, "memoryBytes": int(g.get("memoryBytes") or 0),
                "memoryLimit": self._limit("memory", "memory"),
                "memoryPeakBytes": g.get("memoryPeakBytes"), "pids": int(g.get("pids") or 0),
                "pidsLimit": self._limit("pids", "pids"), "totalProcesses": None,
                "ioReadBytes": int(g.get("ioReadBytes") or 0),
                "ioWriteBytes": int(g.get("ioWriteBytes") or 0),
            }
        cg = self.backend.cgroup()
        c = cg.read()
        pids = self.backend.pids()
        return {
            "read": now_ts(),
            "cpuUsageNs": c.cpu_user_ns + c.cpu_kernel_ns,
            "cpuPercent": 0.0,
            "memoryBytes": c.memory_current,
            "memoryLimit": self._limit("memory", "memory"),
            "memoryPeakBytes": c.memory_peak or None,
            "pids": len(pids),
            "pidsLimit": self._limit("pids", "pids"),
            "totalProcesses": self.backend.total_processes(),
            "ioReadBytes": c.io_read_bytes,
            "ioWriteBytes": c.io_write_bytes,
        }

    def _top(self) -> list[dict[str, Any]]:
        own = getattr(self.backend, "top", None)
        if own is not None:  # vm: the guest's processes, through the agent
            # ``pid`` is the host's view: none of these is a host process (0, as the wire
            # format says); ``containerPid`` is the container's.
            return [{**e, "pid": 0} for e in own()]
        out = []
        for pid in sorted(self.backend.pids()):
            entry = process_entry(pid)
            if entry is not None:
                out.append(entry)
        return out

    # ---- the loop ------------------------------------------------------------------------

    def loop(self) -> None:
        main = self.main
        assert main is not None
        self._register_proc(main)
        while True:
            self._handle_stop_signals()
            timeout = self._timers()
            if self.done:
                pending = [c for c in self.conns.values() if c.out]
                if not pending or time.monotonic() >= self.end_deadline:
                    return
                timeout = min(timeout, max(0.0, self.end_deadline - time.monotonic()))
            for key, mask in self.sel.select(timeout):
                handlers = self._handlers.get(key.fd)
                if handlers is None:
                    continue
                if mask & selectors.EVENT_WRITE and handlers[1] is not None:
                    handlers[1]()
                handlers = self._handlers.get(key.fd)
                if mask & selectors.EVENT_READ and handlers is not None and handlers[0]:
                    handlers[0]()
            self._reap()

    def teardown(self) -> None:
        """Release what was made, in reverse order; each step is tried even if one fails."""
        for conn in list(self.conns.values()):
            self._close(conn)
        self._close_child_ends()
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:
                print(f"monitor: releasing {what}: {exc}", file=sys.stderr)
        self.sel.close()



class _Ready:
    """The readiness pipe: one JSON message, then closed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, msg: dict[str, Any]) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, json.dumps(msg).encode())
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


def _redirect_stdio(log_path: Path | None) -> None:
    """The monitor's own stdio: never the daemon's terminal; diagnostics to monitor.log."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = null
    if log_path is not None:
        with contextlib.suppress(OSError):
            out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def run_monitor(plan_path: Path, ready_fd: int) -> int:
    """The monitor's main: set up, report on ``ready_fd``, serve until the end, release.
    Returns the process's exit code (0 when the container's run was handled)."""
    ready = _Ready(ready_fd)
    try:
        plan = read_plan(plan_path)
    except BaseException as exc:
        _redirect_stdio(None)
        ready.send({"error": wire_error(exc)})
        return 1
    _redirect_stdio(plan.monitor_log)
    print(f"monitor {os.getpid()} for {plan.id} ({plan.isolation}) at {now_ts()}",
          file=sys.stderr)
    try:
        mon = Monitor(plan)
        mon.setup()
    except BaseException as exc:
        traceback.print_exc()
        ready.send({"error": wire_error(exc)})
        return 1
    ready.send({"ok": True, "pid": os.getpid()})
    try:
        mon.loop()
    except BaseException:
        traceback.print_exc()
        if mon.exit is None:  # a bug in the loop: the container must not outlive it
            with contextlib.suppress(Exception):
                mon.backend.signal(signal.SIGKILL, True)
            with contextlib.suppress(Exception):
                write_json_atomic(plan.status_path, {
                    "version": 1, "exitCode": 137, "signal": 9,
                    "error": "the monitor failed; see monitor.log",
                    "startedAt": mon.started_at, "finishedAt": now_ts()})
        return 1
    finally:
        mon.teardown()
        print(f"monitor {os.getpid()}: released at {now_ts()}", file=sys.stderr)
    return 0
