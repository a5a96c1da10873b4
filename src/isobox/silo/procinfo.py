"""What ``top`` shows of one process, read from ``/proc`` (the host's monitor and the guest
agent report the same ``ProcessEntry`` shape, :mod:`isobox.spec.wire`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def process_entry(pid: int) -> dict[str, Any] | None:
    """A ``ProcessEntry`` from ``/proc/<pid>``; None when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields_ = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rest = stat[stat.rindex(")") + 2:].split()
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    ticks = os.sysconf("SC_CLK_TCK")
    nspid = fields_.get("NSpid", str(pid)).split()
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    return {
        "pid": pid,
        "containerPid": int(nspid[-1]) if nspid else pid,
        "ppid": int(fields_.get("PPid", "0").strip() or 0),
        "uid": int(fields_.get("Uid", "0").split()[0]),
        "state": rest[0],
        "cpuTimeNs": (int(rest[11]) + int(rest[12])) * 1_000_000_000 // ticks,
        "rssBytes": int(rest[21]) * os.sysconf("SC_PAGE_SIZE"),
        "command": " ".join(args) if args else f"[{comm}]",
    }


# ---- process entry -------------------------------------------------------------------------
