"""The last steps before a container's process runs: identity, capabilities, seccomp, exec.

Order matters and follows runc: rlimits and oom_score_adj while still privileged; the
capability bounding set; supplementary groups, gid, uid (keeping capabilities across the
switch); the five capability sets; chdir to the process's cwd *as that user*, then the check
that it is inside the container (CVE-2024-21626); no_new_privs; seccomp last; exec.

The exec goes through a *sealed* in-memory copy of a static busybox (``env``): at the moment
the container's program starts, ``/proc/self/exe`` of the process that exec'd it is that
sealed copy, never the host's Python, so an image whose program is ``#!/proc/self/exe``
cannot get a writable handle on a host binary (CVE-2019-5736).
"""

from __future__ import annotations

import fcntl
import os
import resource
from pathlib import Path

from isobox._sys import linux as L
from isobox.errors import InvalidDocument, ToolMissing
from isobox.silo.config import Process
from isobox.silo.rootfs import check_cwd_inside

F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def _static(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x7fELF") and b"ld-linux" not in head


def sealed_trampoline() -> int:
    """A sealed memfd holding a static busybox; exec'd as ``env`` to start the program."""
    src = next((p for p in _BUSYBOX_CANDIDATES if _static(p)), None)
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


def apply(proc: Process, *, new_user_ns: bool) -> None:
    """Identity and capabilities; called as root inside the container, after pivot_root."""
    for num, soft, hard in proc.rlimits:
        resource.setrlimit(num, (soft, hard))
    if proc.oom_score_adj is not None:
        Path("/proc/self/oom_score_adj").write_text(str(proc.oom_score_adj))
    if proc.umask is not None:
        os.umask(proc.umask)
    L.drop_bounding(proc.bounding)
    if not new_user_ns or proc.additional_gids:
        os.setgroups(proc.additional_gids)
    L.prctl(L.PR_SET_KEEPCAPS, 1)
    os.setresgid(proc.gid, proc.gid, proc.gid)
    os.setresuid(proc.uid, proc.uid, proc.uid)
    L.prctl(L.PR_SET_KEEPCAPS, 0)
    L.capset(proc.effective, proc.permitted, proc.inheritable)
    if proc.ambient:
        L.set_ambient(proc.ambient & proc.permitted & proc.inheritable)


def enter_cwd(proc: Process) -> None:
    try:
        os.chdir(proc.cwd)
    except OSError as exc:
        raise InvalidDocument(f"process.cwd {proc.cwd}: {exc.strerror}") from exc
    check_cwd_inside()


def exec_process(proc: Process, trampoline: int, keep_fds: set[int]) -> None:
    """no_new_privs, seccomp, then exec the program through the sealed trampoline."""
    filt = None
    if proc.seccomp:
        from isobox._sys import seccomp

        filt = seccomp.compile_filter(proc.seccomp)
    close_fds(keep_fds | {trampoline})
    if proc.no_new_privileges:
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    if filt is not None:
        filt.load()
    env = list(proc.env)
    if not any(e.startswith("PATH=") for e in env):
        env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    # busybox env: no options, so a program name with "=" in it is not taken as a variable.
    envp = dict(e.split("=", 1) for e in env if "=" in e)
    os.execve(trampoline, ["env", "--", *proc.args], envp)
