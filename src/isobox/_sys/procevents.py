"""The kernel's process events connector (netlink NETLINK_CONNECTOR, CN_IDX_PROC).

Delivers a message for every fork, exec and exit on the machine, as it happens. Jobs use it
to count every process that ever ran in a job and every one that ended (with its exit code
or signal) — counts that cgroups do not keep. Needs CAP_NET_ADMIN.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass

from isobox.errors import SystemError_

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CNMSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVHDR = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_FORK = struct.Struct("=iiii")  # parent pid, parent tgid, child pid, child tgid
_EXIT = struct.Struct("=iiII")  # pid, tgid, exit_code, exit_signal


@dataclass(frozen=True)
class Fork:
    parent_tgid: int
    child_pid: int
    child_tgid: int


@dataclass(frozen=True)
class Exit:
    pid: int
    tgid: int
    status: int  # wait(2) status: exit code << 8, or the terminating signal


ProcEvent = Fork | Exit


class ProcEvents:
    """A subscription to process events; ``fd`` can be waited on with select/selectors."""

    def __init__(self, rcvbuf: int = 8 << 20) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            raise SystemError_("socket(NETLINK_CONNECTOR)", "proc events", exc.errno or 0) from exc
        try:
            # A fork bomb sends thousands of events a second: a large buffer loses fewer.
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            self.sock.bind((0, CN_IDX_PROC))
            self._control(PROC_CN_MCAST_LISTEN)
        except OSError as exc:
            self.sock.close()
            raise SystemError_("subscribe", "proc events", exc.errno or 0) from exc
        self.sock.setblocking(False)
        # Times the kernel dropped messages because we read too slowly (ENOBUFS): a reader
        # that keeps state from these events must then reconcile it some other way.
        self.lost = 0

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def _control(self, op: int) -> None:
        payload = struct.pack("=I", op)
        cn = _CNMSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn)

    def read(self) -> list[ProcEvent]:
        """Every event waiting now (non-blocking)."""
        out: list[ProcEvent] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped messages
                    self.lost += 1
                    continue
                raise
            self._parse(data, out)

    @staticmethod
    def _parse(data: bytes, out: list[ProcEvent]) -> None:
        pos = 0
        while pos + _NLMSGHDR.size <= len(data):
            length = _NLMSGHDR.unpack_from(data, pos)[0]
            if length < _NLMSGHDR.size:
                return
            body = pos + _NLMSGHDR.size + _CNMSG.size
            if body + _EVHDR.size <= pos + length:
                what = _EVHDR.unpack_from(data, body)[0]
                ev = body + _EVHDR.size
                if what == PROC_EVENT_FORK:
                    _ppid, ptgid, cpid, ctgid = _FORK.unpack_from(data, ev)
                    out.append(Fork(ptgid, cpid, ctgid))
                elif what == PROC_EVENT_EXIT:
                    pid, tgid, code, _sig = _EXIT.unpack_from(data, ev)
                    out.append(Exit(pid, tgid, code))
            pos += (length + 3) & ~3

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._control(PROC_CN_MCAST_IGNORE)
        self.sock.close()
