"""Namespaces, mounts, pivot_root, prctl and capabilities: the raw calls, through libc.

Python 3.11 has no ``os.unshare``/``os.setns``; these wrappers are thin, typed, and raise
:class:`isobox.errors.SystemError_` naming the operation, its target and the errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from isobox.errors import SystemError_

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

# clone / unshare flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

NAMESPACE_FLAGS = {
    "mount": CLONE_NEWNS,
    "cgroup": CLONE_NEWCGROUP,
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "user": CLONE_NEWUSER,
    "pid": CLONE_NEWPID,
    "network": CLONE_NEWNET,
    "time": CLONE_NEWTIME,
}
# /proc/<pid>/ns/<name> for each OCI namespace type
NAMESPACE_FILES = {
    "mount": "mnt", "cgroup": "cgroup", "uts": "uts", "ipc": "ipc", "user": "user",
    "pid": "pid", "network": "net", "time": "time",
}

# mount flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# prctl
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_PIVOT_ROOT = 155
SYS_SETNS = 308
SYS_CAPGET = 125
SYS_CAPSET = 126
SYS_CLOSE_RANGE = 436
CLOSE_RANGE_CLOEXEC = 4

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.setdomainname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.syscall.restype = ctypes.c_long


def _check(rc: int, op: str, target: str) -> int:
    if rc < 0:
        raise SystemError_(op, target, ctypes.get_errno())
    return rc


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    rc = _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    _check(rc, f"mount {fstype or ''} {source or ''} ->", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare", hex(flags))


def setns(fd: int, nstype: int = 0, what: str = "") -> None:
    _check(_libc.syscall(SYS_SETNS, fd, nstype), "setns", what or str(fd))


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root", new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), "prctl", str(option))


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), "setdomainname", name)


def close_range_cloexec(first: int) -> None:
    """Mark every descriptor from ``first`` up close-on-exec (none can leak into a container)."""
    _check(_libc.syscall(SYS_CLOSE_RANGE, first, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC),
           "close_range", str(first))


# ---- capabilities (capget/capset, version 3: 64-bit sets) --------------------------------

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]
CAP_NUMBER = {name: i for i, name in enumerate(CAPABILITIES)}


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except OSError:
        return len(CAPABILITIES) - 1


def cap_mask(names: list[str]) -> int:
    mask = 0
    for n in names:
        num = CAP_NUMBER.get(n.upper())
        if num is None:
            continue  # unknown to this kernel's list: ignored, as runc does
        mask |= 1 << num
    return mask


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(SYS_CAPGET, ctypes.byref(hdr), data), "capget", "self")
    eff, perm, inh = (
        int(getattr(data[0], f)) | (int(getattr(data[1], f)) << 32)
        for f in ("effective", "permitted", "inheritable")
    )
    return eff, perm, inh


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    _check(_libc.syscall(SYS_CAPSET, ctypes.byref(hdr), data), "capset", "self")


def drop_bounding(keep: int) -> None:
    for cap in range(last_cap() + 1):
        if not keep & (1 << cap):
            prctl(PR_CAPBSET_DROP, cap)


def set_ambient(caps: int) -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(last_cap() + 1):
        if caps & (1 << cap):
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


# ---- clock and entropy (the utility VM's agent: a VM booted from a template has a stale
# clock and the template's random pool) ----------------------------------------------------

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])


def set_realtime_ns(ns: int) -> None:
    """Set CLOCK_REALTIME (needs CAP_SYS_TIME)."""
    import time

    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, ns)
    except OSError as exc:
        raise SystemError_("clock_settime CLOCK_REALTIME", str(ns), exc.errno or 0) from exc


def add_entropy(data: bytes, *, credit: bool = True) -> None:
    """Mix ``data`` into the kernel's pool with RNDADDENTROPY (crediting 8 bits per byte
    when ``credit``; needs CAP_SYS_ADMIN), as a VM's agent does with the host's bytes."""
    import fcntl
    import struct

    info = struct.pack("ii", len(data) * 8 if credit else 0, len(data)) + data
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
    except OSError as exc:
        raise SystemError_("ioctl RNDADDENTROPY", "/dev/urandom", exc.errno or 0) from exc
    finally:
        os.close(fd)


RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
BLKFLSBUF = 0x1261  # _IO(0x12, 97)


def reseed_crng() -> None:
    """RNDRESEEDCRNG: the kernel's CRNG takes a new key from its pool now, not at its next
    interval. A VM restored from a template has the template's CRNG state; after
    :func:`add_entropy` this makes its next random bytes its own."""
    import fcntl

    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        raise SystemError_("ioctl RNDRESEEDCRNG", "/dev/urandom", exc.errno or 0) from exc
    finally:
        os.close(fd)


def flush_block_buffers(device: str) -> None:
    """BLKFLSBUF: drop what the kernel has cached of a block device. A clone's disk slot
    may hold another file than its template's did; cached blocks of the old one must go."""
    import fcntl

    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    except OSError as exc:
        raise SystemError_("ioctl BLKFLSBUF", device, exc.errno or 0) from exc
    finally:
        os.close(fd)


LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
_libc.reboot.argtypes = [ctypes.c_int]


def power_off() -> None:
    """reboot(LINUX_REBOOT_CMD_POWER_OFF): how a utility VM's pid 1 ends (a pid 1 that
    exits panics the kernel). Returns only on failure, which it raises."""
    _check(_libc.reboot(LINUX_REBOOT_CMD_POWER_OFF), "reboot", "POWER_OFF")
