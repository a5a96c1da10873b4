"""Run another process in a running silo: join its namespaces and its cgroup, then harden.

The caller forks an intermediate (the caller has one thread), which makes itself
non-dumpable (before any setns), joins the cgroup and the namespaces of the container's init
(the user namespace first; the pid namespace takes effect for children only), then — still
outside the container's pid namespace, where no process of the container can see it — sets
up the terminal, the identity, capabilities, working directory, no_new_privs and seccomp.
The process inside the pid namespace is made by ``posix_spawn`` of the sealed trampoline
(clone and exec, no Python in between, a new session): the container never sees a process
whose exe is the host's Python. Without ``detach`` the caller, a child subreaper, waits for
it and returns its exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from isobox._sys import linux as L
from isobox.jobs.cgroup import Cgroup
from isobox.silo import harden
from isobox.silo.config import Process
from isobox.silo.init import (
    _recv,
    _send,
    default_signals,
    forked_child,
    pty_to_console,
    slave_on_stdio,
)

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
    user_ns: bool = False,
) -> int:
    """Returns the process's exit status (128+signal when killed), or its pid if detached.

    ``user_ns``: the container has its own user namespace (recorded in its state)."""
    filt = harden.compile_seccomp(proc)  # before setns: host files are out of reach after
    trampoline = harden.sealed_trampoline()
    if not detach:
        L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mid = os.fork()
    if mid == 0:
        code = 1
        try:
            forked_child()
            parent.close()
            _intermediate(init_pid, cgroup, proc, child, console=console_socket,
                          trampoline=trampoline, preserve_fds=preserve_fds, filt=filt,
                          user_ns=user_ns)
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
                  filt: Filter | None, user_ns: bool) -> None:
    # Before joining anything: a process of the container must never ptrace this one or
    # open its /proc files (its exe is the host's Python). Inherited by the fork below.
    L.prctl(L.PR_SET_DUMPABLE, 0)
    keep = {0, 1, 2, *range(3, 3 + preserve_fds)}
    # Now, while /proc is the host's (this process has no pid in the container's /proc):
    # nothing of the runtime's reaches the process.
    harden.close_fds(keep | {trampoline, sock.fileno()}
                     | ({console.fileno()} if console is not None else set()))
    if proc.oom_score_adj is not None:
        # Through the host's /proc, now; inherited by the process (harden.apply would use
        # /proc/self, where this process is not, once in the container's mount namespace).
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write(str(proc.oom_score_adj))
        proc = dataclasses.replace(proc, oom_score_adj=None)
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
    # Everything is done here, outside the container's pid namespace (where none of its
    # processes can see this one): identity, capabilities, cwd, no_new_privs, seccomp. The
    # process in the pid namespace is then made by posix_spawn (clone + exec, no Python in
    # between): the container never sees a process whose exe is the host's Python, which
    # PR_SET_DUMPABLE alone does not hide from a container holding CAP_SYS_PTRACE.
    pts = _terminal_stdio(console) if proc.terminal else None
    harden.apply(proc, new_user_ns=user_ns, filt=filt)
    harden.enter_cwd(proc)
    if proc.no_new_privileges:
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        if filt is not None:
            filt.load()
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = []
    if pts is not None:
        # Opened by the new session's leader without O_NOCTTY: it becomes the controlling
        # terminal (setsid runs before the file actions).
        actions.append((os.POSIX_SPAWN_OPEN, 0, pts, os.O_RDWR, 0))
    # The memfd through the /proc of the container's pid namespace, where the new process
    # is (its own descriptor table, a copy of this one).
    default_signals()  # ignored dispositions (Python's SIGPIPE) would survive the exec
    pid = os.posix_spawn(f"/proc/self/fd/{trampoline}", ["env", "--", *proc.args],
                         harden.exec_env(proc), setsid=True, file_actions=actions)
    _send(sock, {"pid": pid})
    _send(sock, {"exec": True})


def _terminal_stdio(console: socket.socket | None) -> str:
    """A pty from the container's devpts (master to the console socket), its slave on
    stdio; returns the slave's path (the new process opens it to make it its terminal)."""
    slave, path = pty_to_console(console)
    slave_on_stdio(slave)  # given to the process's user by harden.apply (fix_stdio_owner)
    return path
