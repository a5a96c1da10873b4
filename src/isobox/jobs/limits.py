"""A Job's limits, its accounting and its events, as plain values (no cgroup code here).

Units follow the Windows Job object / HCS document where they exist:

* ``cpu_rate``: hard CPU cap in 1/100 of a percent of the *whole machine* (``CpuRate``):
  10000 is every CPU, 1000 is 10% of the machine. ``cpus=1.5`` converts with
  :func:`cpu_rate_from_cpus`. A small rate gets a longer CFS period (up to 1 s) so that it
  is enforced exactly; below what the kernel's 1 ms minimum quota per 1 s allows (a rate
  under 10 divided by the number of CPUs) the nearest enforceable rate is used and
  ``cpu_rate`` is listed in :attr:`Limits.clamped`.
* ``cpu_weight``: 1..10000 (``ProcessorWeight``), 100 is the default share.
* ``memory``: the job's committed memory limit in bytes (``JobMemoryLimit``).
* ``process_memory``: a per-process limit in bytes (``ProcessMemoryLimit``), applied as
  ``RLIMIT_AS`` to every process the job spawns (children inherit it).
* ``pids``: the job's **task** limit: processes *and threads* count, because that is what
  the kernel's pids controller counts (a process with 8 threads uses 9). It is the nearest
  cgroups have to ``ActiveProcessLimit``, which counts processes only: size it for the
  threads the job's programs start (a JVM or a Go program starts dozens).
* ``io``: per-device rates (bytes/s and operations/s, read and write).
* ``cpuset``: the CPUs the job may run on (``"0-1"``), the Job object's affinity.

Nesting rule: a child job's effective limit is never looser than its parent's. A looser
setting is **clamped** (not refused): the child's effective value is the parent's, and
:attr:`Limits.clamped` names the fields that were clamped so callers can tell the user.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from isobox.errors import InvalidArgument

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``20m`` -> 20 MiB; ``512k``, ``1.5g``, ``4096`` (bytes). Binary units, as docker."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"invalid size {text!r} (examples: 20m, 512k, 1g, 4096)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise InvalidArgument(f"invalid size {text!r}: must be at least 1 byte")
    return int(value)


def cpu_rate_from_cpus(cpus: float, ncpu: int | None = None) -> int:
    """``cpus=1.5`` on a 2-CPU machine is a CpuRate of 7500 (75% of the machine)."""
    n = ncpu or os.cpu_count() or 1
    if not math.isfinite(cpus) or cpus <= 0:
        raise InvalidArgument(f"--cpus must be a positive number, not {cpus}")
    if cpus > n:
        raise InvalidArgument(f"--cpus {cpus} is more than the {n} CPUs of this machine")
    return max(1, round(cpus / n * 10000))


@dataclass(frozen=True)
class IoLimit:
    device: str  # "MAJOR:MINOR"
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None

    @staticmethod
    def for_path(path: str, **rates: int | None) -> IoLimit:
        """The limit for the block device behind ``path`` (a device node or a file on it)."""
        st = os.stat(path)
        dev = st.st_rdev if st.st_rdev else st.st_dev
        return IoLimit(_whole_disk(os.major(dev), os.minor(dev)), **rates)


def _whole_disk(major: int, minor: int) -> str:
    """``major:minor`` of the disk that holds a block device: cgroups throttle whole disks
    only. A partition's disk is its parent in sysfs -- not minor 0 of the same major
    (``8:16`` is sdb, not a partition of sda; every virtio disk is major 254)."""
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    if (sysfs / "partition").exists():
        with contextlib.suppress(OSError, ValueError):
            parent = (sysfs.resolve().parent / "dev").read_text().split(":")
            return f"{int(parent[0])}:{int(parent[1])}"
    return f"{major}:{minor}"


@dataclass(frozen=True)
class Limits:
    cpu_rate: int | None = None
    cpu_weight: int | None = None
    memory: int | None = None
    process_memory: int | None = None
    pids: int | None = None
    io: tuple[IoLimit, ...] = ()
    cpuset: str | None = None
    clamped: tuple[str, ...] = field(default=(), compare=False)

    def validate(self) -> Limits:
        if self.cpu_rate is not None and not 1 <= self.cpu_rate <= 10000:
            raise InvalidArgument(f"cpu_rate {self.cpu_rate}: must be 1..10000")
        if self.cpu_weight is not None and not 1 <= self.cpu_weight <= 10000:
            raise InvalidArgument(f"cpu_weight {self.cpu_weight}: must be 1..10000")
        for name in ("memory", "process_memory", "pids"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise InvalidArgument(f"{name} {v}: must be positive")
        if self.cpuset is not None:
            parse_cpuset(self.cpuset)
        return self

    def merge(self, other: Limits) -> Limits:
        """``self`` with every field that ``other`` sets replaced (a live update)."""
        changes = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if f.name != "clamped" and getattr(other, f.name) not in (None, ())
        }
        return replace(self, **changes)

    def clamp_to(self, parent: Limits) -> Limits:
        """The effective limits under ``parent``: never looser (see the module doc)."""
        out = self
        clamped: list[str] = []
        for name in ("cpu_rate", "memory", "process_memory", "pids"):
            mine, theirs = getattr(self, name), getattr(parent, name)
            if theirs is not None and (mine is None or mine > theirs):
                if mine is not None:
                    clamped.append(name)
                out = replace(out, **{name: theirs})
        if parent.cpuset is not None:
            allowed = parse_cpuset(parent.cpuset)
            mine_set = parse_cpuset(self.cpuset) if self.cpuset else allowed
            inter = mine_set & allowed
            if self.cpuset and inter != mine_set:
                clamped.append("cpuset")
            out = replace(out, cpuset=format_cpuset(inter or allowed))
        theirs_io = {i.device: i for i in parent.io}
        io: list[IoLimit] = []
        for lim in self.io:
            p = theirs_io.pop(lim.device, None)
            if p is None:
                io.append(lim)
                continue
            merged = {}
            for k in ("read_bps", "write_bps", "read_iops", "write_iops"):
                a, b = getattr(lim, k), getattr(p, k)
                merged[k] = b if a is None or (b is not None and a > b) else a
                if a is not None and b is not None and a > b:
                    clamped.append(f"io.{k}")
            io.append(IoLimit(lim.device, **merged))
        io.extend(theirs_io.values())
        return replace(out, io=tuple(io), clamped=tuple(clamped))


MAX_CPUS = 8192  # the kernel's largest NR_CPUS: no CPU number reaches it


def parse_cpuset(text: str) -> frozenset[int]:
    """``"0-2,5"`` -> {0, 1, 2, 5}. CPU numbers are checked (< 8192) before a range is
    expanded, so a hostile range costs nothing."""
    cpus: set[int] = set()
    try:
        for raw in text.split(","):
            part = raw.strip()
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            first, last = int(lo), int(hi if dash else lo)
            if not 0 <= first <= last < MAX_CPUS:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError as exc:
        raise InvalidArgument(f"invalid cpuset {text!r} (examples: 0, 0-1, 0,2; CPU numbers "
                              f"below {MAX_CPUS})") from exc
    if not cpus:
        raise InvalidArgument(f"invalid cpuset {text!r}: no CPU in it")
    return frozenset(cpus)


def format_cpuset(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True)
class Accounting:
    """What a job used, including processes that have already exited.

    The CPU, memory, fault and I/O figures come from the cgroup (which keeps them after a
    process ends); the process counts come from the kernel's process events, because cgroups
    do not count processes that came and went.
    """

    cpu_user_s: float
    cpu_kernel_s: float
    memory_current_bytes: int
    memory_peak_bytes: int
    page_faults: int
    io_read_bytes: int
    io_write_bytes: int
    io_read_ops: int
    io_write_ops: int
    total_processes: int
    active_processes: int
    terminated_processes: int
    killed_by_limit: int
    cpu_throttled_periods: int


EventKind = Literal["memory_limit", "oom_kill", "process_limit", "cpu_throttled"]


@dataclass(frozen=True)
class JobEvent:
    """A notification from a job, as Windows' job completion port messages."""

    kind: EventKind
    job: str
    time: float
    pid: int | None = None
    count: int = 1

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "job": self.job, "time": self.time, "pid": self.pid,
                "count": self.count}
