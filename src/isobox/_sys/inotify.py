"""inotify through libc (the stdlib has no binding): watch cgroup event files.

cgroup "events" files (``memory.events``, ``pids.events``, ``cgroup.events``) signal a change
with a modify event (kernfs notify), so a blocking read on the inotify fd delivers them with
no polling.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

from isobox.errors import SystemError_

IN_MODIFY = 0x00000002
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class Inotify:
    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise SystemError_("inotify_init1", "-", ctypes.get_errno())
        self.fd: int = fd

    def add_watch(self, path: str, mask: int = IN_MODIFY) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise SystemError_("inotify_add_watch", path, ctypes.get_errno())
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        if _libc.inotify_rm_watch(self.fd, wd) < 0:
            raise SystemError_("inotify_rm_watch", str(wd), ctypes.get_errno())

    def read(self) -> list[int]:
        """Watch descriptors that fired since the last read (non-blocking)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out: list[int] = []
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, pos)
            out.append(wd)
            pos += _EVENT.size + length
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
