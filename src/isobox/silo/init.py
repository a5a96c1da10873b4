"""Bringing a silo up: two forks from a single-threaded process, and a sync protocol.

::

    caller (single-threaded)            stage 1                      init (pid 1 inside)
    ─────────────────────────            ───────                      ───────────────────
    fork ──────────────────────────────▶ "stage1"
    add stage 1 to the job's cgroup ───▶ "go"
                                         non-dumpable; setgroups([])
                                         setns(paths) / unshare(new)
                                         [new user ns: "idmap" ◀─▶ maps written]
                                         unshare(pid); fork ────────▶
    ◀──────────────────────────────────  {"init": pid}; exit          setsid; mounts, /dev
    ◀────────────────────────────────────────────────────────────────  "hooks"
    prestart, createRuntime hooks (host)
    {"state": ...} ──────────────────────────────────────────────────▶ createContainer hooks
                                                                      (host paths, container
                                                                      namespaces); pivot_root
    ◀────────────────────────────────────────────────────────────────  "created" / {"error"}
                                                                      open exec fifo for
                                                                      writing: blocks until
    (``start`` opens the fifo's read end) ───────────────────────────▶ start; harden;
                                                                      startContainer hooks
                                                                      (as the process); exec

Messages are JSON over a SOCK_SEQPACKET socketpair. Everything privileged happens in forked
children of a process that has no other threads (DESIGN.md: never clone from a threaded
process); an error anywhere is sent back with the step that failed, and the caller cleans up.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import socket
import termios
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from isobox._sys import linux as L
from isobox.errors import Conflict, IsoboxError
from isobox.silo import harden, rootfs
from isobox.silo.config import SiloConfig
from isobox.silo.hooks import run_hook

if TYPE_CHECKING:
    from isobox._sys.seccomp import Filter


class InitError(IsoboxError):
    """The container could not be set up; the message names the step."""


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(json.dumps(msg).encode())


def _recv(sock: socket.socket, what: str) -> dict[str, Any]:
    data = sock.recv(1 << 20)
    if not data:
        raise InitError(f"container init exited during {what}")
    msg: dict[str, Any] = json.loads(data)
    if "error" in msg:
        raise InitError(f"{msg.get('step', what)}: {msg['error']}")
    return msg


def _write_id_maps(pid: int, cfg: SiloConfig) -> None:
    def fmt(rows: list[tuple[int, int, int]]) -> str:
        return "".join(f"{c} {h} {n}\n" for c, h, n in rows)

    # "allow": the maps are written by a privileged runtime, so setgroups() need not be
    # denied, and the container's process must be able to drop the caller's supplementary
    # groups (harden.apply always calls setgroups, with an empty list when there are none).
    with open(f"/proc/{pid}/setgroups", "w") as fh:
        fh.write("allow")
    with open(f"/proc/{pid}/uid_map", "w") as fh:
        fh.write(fmt(cfg.uid_map))
    with open(f"/proc/{pid}/gid_map", "w") as fh:
        fh.write(fmt(cfg.gid_map))


def spawn(
    cfg: SiloConfig,
    *,
    join_cgroup: Callable[[int], None],
    exec_fifo: str | None,
    console_socket: socket.socket | None = None,
    preserve_fds: int = 0,
    before_pivot: Callable[[int], dict[str, Any]] | None = None,
) -> int:
    """Create the silo; returns the host pid of its init, which waits on ``exec_fifo``.

    With ``exec_fifo`` None the init does not wait: the program starts at once (``run``).
    ``before_pivot(init_pid)`` is called once the init's mounts are made and before its
    ``pivot_root`` (the runtime's prestart and createRuntime hooks); it returns the OCI state
    the init hands to the createContainer and startContainer hooks it runs itself.
    """
    if not cfg.new_namespace("mount"):
        raise InitError("a container needs its own mount namespace (linux.namespaces: mount)")
    # Everything the init needs from host files is loaded now: after pivot_root it cannot.
    filt = harden.compile_seccomp(cfg.process)
    trampoline = harden.sealed_trampoline()
    # Opened here, as host root: the init (maybe an unprivileged uid in a user namespace)
    # reaches the fifo through this descriptor, never through the host path.
    fifo_fd = os.open(exec_fifo, os.O_PATH | os.O_CLOEXEC) if exec_fifo else -1
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # stage 1
        code = 1
        try:
            forked_child()
            parent.close()
            _stage1(cfg, child, _Pass(fifo_fd, console_socket, trampoline, preserve_fds,
                                      filt))
            code = 0
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _send(child, {"error": str(exc), "step": getattr(exc, "step", "stage 1")})
        finally:
            os._exit(code)
    child.close()
    os.close(trampoline)
    if fifo_fd >= 0:
        os.close(fifo_fd)
    init_pid = 0
    try:
        with parent:
            _recv(parent, "stage 1")
            join_cgroup(pid)
            _send(parent, {"go": True})
            msg = _recv(parent, "namespaces")
            if msg.get("idmap"):
                _write_id_maps(pid, cfg)
                _send(parent, {"go": True})
                msg = _recv(parent, "namespaces")
            init_pid = int(msg["init"])
            _recv(parent, "root filesystem")  # {"hooks": True}: mounts made, not pivoted
            state = before_pivot(init_pid) if before_pivot is not None else {}
            _send(parent, {"state": state})
            _recv(parent, "root filesystem")  # "created"
    except BaseException:
        if init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init_pid, 9)
        raise
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return init_pid


@dataclass(frozen=True)
class _Pass:
    """What the caller hands down to the init."""

    fifo: int  # an O_PATH descriptor of the exec fifo, or -1: no path to traverse inside
    console: socket.socket | None
    trampoline: int
    preserve_fds: int
    seccomp: Filter | None


def _stage1(cfg: SiloConfig, sock: socket.socket, p: _Pass) -> None:
    # Nothing in the container may ptrace this process or open its /proc files (its exe
    # is the host's Python) while it joins namespaces; the init inherits this.
    L.prctl(L.PR_SET_DUMPABLE, 0)
    os.setgroups([])  # the caller's supplementary groups never reach the container
    _send(sock, {"stage1": True})
    _recv(sock, "cgroup")
    # Open every namespace to join first: the paths are host paths.
    joins = []
    for kind, path in cfg.namespaces:
        if path is not None:
            joins.append((kind, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
    joins.sort(key=lambda j: j[0] != "user")  # the user namespace first
    for kind, fd in joins:
        L.setns(fd, L.NAMESPACE_FLAGS[kind], f"{kind} namespace")
        os.close(fd)
    if cfg.new_namespace("user"):
        L.unshare(L.CLONE_NEWUSER)
        _send(sock, {"idmap": True})
        _recv(sock, "id maps")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    flags = 0
    for kind in ("mount", "uts", "ipc", "network", "cgroup", "time"):
        if cfg.new_namespace(kind):
            flags |= L.NAMESPACE_FLAGS[kind]
    L.unshare(flags)
    if cfg.new_namespace("pid"):
        L.unshare(L.CLONE_NEWPID)
    # The init shares ``sock``: it may speak only after {"init": pid} is sent, or under
    # load its {"hooks": True} overtakes that message and the caller reads it as the pid.
    turn_r, turn_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(turn_w)
            os.read(turn_r, 1)
            os.close(turn_r)
            _init(cfg, sock, p)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _send(sock, {"error": str(exc), "step": getattr(exc, "step", "init")})
        finally:
            os._exit(code)
    os.close(turn_r)
    try:
        _send(sock, {"init": pid})
    finally:
        os.write(turn_w, b"\0")
        os.close(turn_w)


class _Step:
    """Name the step an exception happened in (for the error sent to the caller)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and not hasattr(exc, "step"):
            with contextlib.suppress(AttributeError):
                exc.step = self.name  # type: ignore[attr-defined]


def _init(cfg: SiloConfig, sock: socket.socket, p: _Pass) -> None:
    os.setsid()
    L.prctl(L.PR_SET_DUMPABLE, 0)  # /proc/1/exe etc. closed to the container's processes
    fifo_fd = p.fifo
    with _Step("root filesystem"):
        rootfs.prepare(cfg)
    # The runtime runs its prestart and createRuntime hooks now, then sends the state.
    _send(sock, {"hooks": True})
    state: dict[str, Any] = _recv(sock, "runtime hooks").get("state", {})
    with _Step("createContainer hooks"):
        # In every namespace of the container, before pivot_root: the path resolves on the
        # host (never in the image), the working directory is the root (as runc).
        os.chdir(cfg.root)
        for hook in cfg.hooks.get("create_container", []):
            run_hook(hook, json.dumps({**state, "status": "creating"}).encode())
    with _Step("root filesystem"):
        rootfs.pivot(cfg.root)
        rootfs.finish(cfg)
    if cfg.process.terminal:
        with _Step("terminal"):
            _setup_terminal(p.console)
    _send(sock, {"created": True})
    sock.close()
    if fifo_fd >= 0:
        # Blocks until `start` opens the other end (the fifo lives on the host; this
        # descriptor reaches it through the container's /proc).
        fd = os.open(f"/proc/self/fd/{fifo_fd}", os.O_WRONLY | os.O_CLOEXEC)
        os.write(fd, b"0")
        os.close(fd)
        os.close(fifo_fd)
    start_hooks = cfg.hooks.get("start_container", [])

    def start_container() -> None:
        # As the container's process: its namespaces, cgroup, identity, capabilities,
        # no_new_privs and seccomp; the path resolves inside the container.
        for hook in start_hooks:
            run_hook(hook, json.dumps({**state, "status": "created"}).encode())

    try:
        keep = {0, 1, 2, *range(3, 3 + p.preserve_fds)}
        default_signals()
        harden.close_fds(keep | {p.trampoline})
        harden.apply(cfg.process, new_user_ns=cfg.new_namespace("user"), filt=p.seccomp)
        harden.enter_cwd(cfg.process)
        harden.exec_process(cfg.process, p.trampoline, keep, p.seccomp,
                            before_exec=start_container if start_hooks else None)
    except BaseException as exc:
        # After `created` the runtime has exited: the container's stderr is the one place
        # the reason can still reach (podman, docker and ctr show it).
        with contextlib.suppress(OSError):
            os.write(2, f"isobox-runtime: starting the container process: {exc}\n".encode())
        os._exit(127)


def forked_child() -> None:
    """First thing in a child forked by the engine: drop the parent's Python signal set-up.

    The parent may be the monitor, with a wakeup fd and a SIGCHLD handler: inherited, a
    signal in the child runs that handler and writes to a descriptor the child has closed
    (or, worse, reused for the container's stdio — the byte would land in its stream)."""
    import signal

    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(sig)
            if callable(handler):  # a Python-level handler (default_int_handler too)
                signal.signal(sig, signal.SIG_DFL)


def default_signals() -> None:
    """Every ignored signal back to its default: an ignored disposition survives exec, and
    Python ignores SIGPIPE and SIGXFSZ (a container's ``yes | head`` must end by SIGPIPE)."""
    import signal

    for sig in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)


_TIOCSPTLCK = 0x40045431  # unlock the pty slave
_TIOCGPTN = 0x80045430  # the pty's number


def receive_console(listener: socket.socket, timeout: float = 10.0) -> int:
    """The other end of :func:`pty_to_console`: accept the init's connection on the console
    socket ``listener`` and return the pty master it sent (non-blocking)."""
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    with conn:
        _, fds, _, _ = socket.recv_fds(conn, 64, 1)
    if not fds:
        raise Conflict("the container's init sent no terminal")
    os.set_blocking(fds[0], False)
    return fds[0]


def pty_to_console(console: socket.socket | None) -> tuple[int, str]:
    """A pty from the container's devpts: its master goes to the console socket (and is
    closed here); returns the slave's descriptor and path."""
    if console is None:
        raise InitError("process.terminal is set but no --console-socket was given")
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, _TIOCSPTLCK, array.array("i", [0]))
    n = array.array("i", [0])
    fcntl.ioctl(master, _TIOCGPTN, n)
    path = f"/dev/pts/{n[0]}"
    slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
    socket.send_fds(console, [b"/dev/ptmx"], [master])
    os.close(master)
    console.close()
    return slave, path


def slave_on_stdio(slave: int) -> None:
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)


def _setup_terminal(console: socket.socket | None) -> None:
    """The init's terminal: the pty's slave is its controlling terminal and stdio."""
    slave, _ = pty_to_console(console)
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    slave_on_stdio(slave)


@contextlib.contextmanager
def stdio_as(fds: tuple[int | None, int | None, int | None]) -> Iterator[None]:
    """Point this process's 0/1/2 at ``fds`` (None: /dev/null) for the call, restored
    after: the init and exec's intermediate take their stdio from their caller (the host's
    monitor, the guest agent), which must be single-threaded while this lasts."""
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    null = -1
    try:
        for target, given in zip((0, 1, 2), fds, strict=True):
            if given is None and null < 0:
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(null if given is None else given, target)
        yield
    finally:
        for target, fd in zip((0, 1, 2), saved, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        if null >= 0:
            os.close(null)
