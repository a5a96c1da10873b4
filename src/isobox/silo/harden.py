"""The last steps before a container's process runs: identity, capabilities, seccomp, exec.

Order matters and follows runc: rlimits and oom_score_adj while still privileged; seccomp
if there is no no_new_privs; the stdio given to the process's user; the capability bounding
set; supplementary groups, gid, uid (keeping capabilities across the switch); the five
capability sets; chdir to the process's cwd *as that user*, then the check
that it is inside the container (CVE-2024-21626); no_new_privs; seccomp last; exec.

The exec goes through a *sealed* in-memory copy of a static busybox (``env``): at the moment
the container's program starts, ``/proc/self/exe`` of the process that exec'd it is that
sealed copy, never the host's Python, so an image whose program is ``#!/proc/self/exe``
cannot get a writable handle on a host binary (CVE-2019-5736).
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from isobox._sys import linux as L
from isobox.errors import InvalidDocument, ToolMissing
from isobox.paths import installed_static_busybox
from isobox.silo.config import Process
from isobox.silo.rootfs import check_cwd_inside

if TYPE_CHECKING:
    from isobox._sys.seccomp import Filter

F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
def sealed_trampoline() -> int:
    """A sealed memfd holding a static busybox; exec'd as ``env`` to start the program."""
    src = installed_static_busybox()
    if src is None:
        raise ToolMissing("a static busybox is needed to start containers: "
                          "apt-get install busybox-static")
    fd = os.memfd_create("isobox-exec", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    with open(src, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        copied = 0
        while copied < size:
            n = os.sendfile(fd, fh.fileno(), copied, size - copied)
            if n == 0:
                break
            copied += n
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
    return fd


def close_fds(keep: set[int]) -> None:
    """Close every descriptor not in ``keep``: nothing of the runtime leaks into the container."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                continue


def apply(proc: Process, *, new_user_ns: bool, filt: Filter | None = None) -> None:
    """Identity and capabilities; called as root inside the container, after pivot_root.

    Without no_new_privs, loading a seccomp filter needs CAP_SYS_ADMIN, so then (as runc)
    ``filt`` is loaded here, before the capabilities are dropped; with no_new_privs it is
    loaded as late as possible, by :func:`exec_process`."""
    for num, soft, hard in proc.rlimits:
        resource.setrlimit(num, (soft, hard))
    if proc.oom_score_adj is not None:
        Path("/proc/self/oom_score_adj").write_text(str(proc.oom_score_adj))
    if proc.umask is not None:
        os.umask(proc.umask)
    if filt is not None and not proc.no_new_privileges:
        filt.load()
    fix_stdio_owner(proc.uid)
    L.drop_bounding(proc.bounding)
    # Always, also in a user namespace (its setgroups file says "allow": the runtime writes
    # the maps as a privileged process, init._write_id_maps): the caller's supplementary
    # groups must not stay with the container's process. ``new_user_ns`` (the container
    # has its own user namespace, for exec: joins one) changes nothing here any more.
    del new_user_ns
    os.setgroups(proc.additional_gids)
    L.prctl(L.PR_SET_KEEPCAPS, 1)
    os.setresgid(proc.gid, proc.gid, proc.gid)
    os.setresuid(proc.uid, proc.uid, proc.uid)
    L.prctl(L.PR_SET_KEEPCAPS, 0)
    L.capset(proc.effective, proc.permitted, proc.inheritable)
    if proc.ambient:
        L.set_ambient(proc.ambient & proc.permitted & proc.inheritable)


def fix_stdio_owner(uid: int) -> None:
    """Give the process's stdio (the engine's pipes, or the terminal) to its user, as runc
    does, so that a process that is not root can reopen them (``echo > /dev/stdout``
    opens ``/proc/self/fd/1`` anew, which checks the pipe's owner and mode, 0600 root).
    ``/dev/null`` and descriptors the user owns already are left alone; so is a descriptor
    whose owner cannot be changed here (not mapped in a user namespace, read-only)."""
    try:
        null = os.stat("/dev/null").st_rdev
    except OSError:
        null = -1
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_uid == uid or (null != -1 and st.st_rdev == null):
            continue
        try:
            os.fchown(fd, uid, -1)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM, errno.EROFS):
                raise


def enter_cwd(proc: Process) -> None:
    try:
        os.chdir(proc.cwd)
    except OSError as exc:
        raise InvalidDocument(f"process.cwd {proc.cwd}: {exc.strerror}") from exc
    check_cwd_inside()


def compile_seccomp(proc: Process) -> Filter | None:
    """The process's seccomp filter, compiled by libseccomp into its BPF program, once per
    distinct profile in this process and its forks (``seccomp.compile_cached``).

    Called by the runtime *before* it forks into the container: after ``pivot_root`` (or
    ``setns`` into the container's mount namespace) neither isobox's modules nor libseccomp
    can be loaded any more, since the host's files are out of reach."""
    if not proc.seccomp:
        return None
    from isobox._sys import seccomp

    return seccomp.compile_cached(proc.seccomp)


def exec_process(proc: Process, trampoline: int, keep_fds: set[int],
                 filt: Filter | None, *, before_exec: Callable[[], None] | None = None,
                 ) -> None:
    """no_new_privs, seccomp (compiled beforehand; loaded here only with no_new_privs, see
    :func:`apply`), ``before_exec`` (the startContainer hooks: with everything of the
    process in force), then exec the program through the sealed trampoline."""
    close_fds(keep_fds | {trampoline})
    if proc.no_new_privileges:
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        if filt is not None:
            filt.load()
    if before_exec is not None:
        before_exec()
    # busybox env: no options, so a program name with "=" in it is not taken as a variable.
    os.execve(trampoline, ["env", "--", *proc.args], exec_env(proc))


def exec_env(proc: Process) -> dict[str, str]:
    """The process's environment, with a default PATH."""
    env = list(proc.env)
    if not any(e.startswith("PATH=") for e in env):
        env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return dict(e.split("=", 1) for e in env if "=" in e)
