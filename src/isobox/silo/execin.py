"""Run another process in a running silo: join its namespaces and its cgroup, then harden.

The caller forks an intermediate (the caller has one thread), which joins the cgroup and
the namespaces of the container's init (the user namespace first; the pid namespace takes
effect for children, so it forks again). The grandchild — inside everything — sets up its
terminal, identity and working directory, reports its pid, and execs through the sealed
trampoline with the container's seccomp filter. Without ``detach`` the caller, a child
subreaper, waits for it and returns its exit code.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from isobox._sys import linux as L
from isobox.jobs.cgroup import Cgroup
from isobox.silo import harden
from isobox.silo.config import Process
from isobox.silo.init import _recv, _send, _setup_terminal

if TYPE_CHECKING:
    from isobox._sys.seccomp import Filter

NS_ORDER = ["user", "mount", "uts", "ipc", "network", "cgroup", "time", "pid"]


def exec_in(
    init_pid: int,
    cgroup: Cgroup,
    proc: Process,
    *,
    detach: bool,
    console_socket: socket.socket | None = None,
    preserve_fds: int = 0,
    on_pid: Callable[[int], None] | None = None,
) -> int:
    """Returns the process's exit status (128+signal when killed), or its pid if detached."""
    filt = harden.compile_seccomp(proc)  # before setns: host files are out of reach after
    trampoline = harden.sealed_trampoline()
    if not detach:
        L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mid = os.fork()
    if mid == 0:
        code = 1
        try:
            parent.close()
            _intermediate(init_pid, cgroup, proc, child, console=console_socket,
                          trampoline=trampoline, preserve_fds=preserve_fds, filt=filt)
            code = 0
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _send(child, {"error": str(exc), "step": "joining the container"})
        finally:
            os._exit(code)
    child.close()
    os.close(trampoline)
    try:
        with parent:
            pid = int(_recv(parent, "joining the container")["pid"])
            _recv(parent, "starting the process")
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(mid, 0)
    if on_pid is not None:
        on_pid(pid)
    if detach:
        return pid
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(
        status
    )


def _intermediate(init_pid: int, cgroup: Cgroup, proc: Process, sock: socket.socket, *,
                  console: socket.socket | None, trampoline: int, preserve_fds: int,
                  filt: Filter | None) -> None:
    cgroup.add(os.getpid())
    fds = []
    for kind in NS_ORDER:
        name = L.NAMESPACE_FILES[kind]
        theirs = f"/proc/{init_pid}/ns/{name}"
        try:
            if os.stat(theirs).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
                continue
        except FileNotFoundError:
            continue
        fds.append((kind, os.open(theirs, os.O_RDONLY | os.O_CLOEXEC)))
    for kind, fd in fds:
        L.setns(fd, L.NAMESPACE_FLAGS[kind], f"{kind} namespace of {init_pid}")
        os.close(fd)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            L.prctl(L.PR_SET_DUMPABLE, 0)
            if proc.terminal:
                _setup_terminal(console)
            keep = {0, 1, 2, *range(3, 3 + preserve_fds)}
            harden.apply(proc, new_user_ns=False, filt=filt)
            harden.enter_cwd(proc)
            _send(sock, {"exec": True})
            sock.close()
            harden.exec_process(proc, trampoline, keep, filt)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _send(sock, {"error": str(exc), "step": "starting the process"})
        finally:
            os._exit(code)
    _send(sock, {"pid": pid})

