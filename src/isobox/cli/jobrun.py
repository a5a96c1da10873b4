"""``isobox job run``: a host command in a fresh Job, its accounting printed at exit."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any

import click

from isobox.errors import InvalidArgument
from isobox.jobs import IoLimit, Job, Limits
from isobox.jobs.limits import cpu_rate_from_cpus, parse_size


def _io(specs: Sequence[str], key: str) -> list[IoLimit]:
    out = []
    for spec in specs:
        dev, sep, rate = spec.rpartition(":")
        if not sep or not dev:
            raise InvalidArgument(f"--io-{key.replace('_', '-')} {spec!r}: use DEVICE:RATE")
        try:
            out.append(IoLimit.for_path(dev, **{key: parse_size(rate)}))
        except FileNotFoundError as exc:
            raise InvalidArgument(f"--io-{key.replace('_', '-')}: no such device {dev}") from exc
    return out


def build_limits(
    *, cpu_rate: int | None, cpus: float | None, cpu_weight: int | None, memory: str | None,
    process_memory: str | None, pids: int | None, cpuset: str | None,
    io_read: Sequence[str] = (), io_write: Sequence[str] = (),
) -> Limits:
    if cpu_rate is not None and cpus is not None:
        raise InvalidArgument("--cpu-rate and --cpus say the same thing: give one")
    return Limits(
        cpu_rate=cpu_rate if cpus is None else cpu_rate_from_cpus(cpus),
        cpu_weight=cpu_weight,
        memory=parse_size(memory) if memory else None,
        process_memory=parse_size(process_memory) if process_memory else None,
        pids=pids,
        cpuset=cpuset,
        io=tuple(_io(io_read, "read_bps") + _io(io_write, "write_bps")),
    ).validate()


def run_job(
    command: list[str], *, name: str | None, fmt: str, io_read_bps: Sequence[str] = (),
    io_write_bps: Sequence[str] = (), **limits: Any,
) -> int:
    lim = build_limits(io_read=io_read_bps, io_write=io_write_bps, **limits)
    started = time.monotonic()
    with Job(name, limits=lim) as job:
        proc = job.spawn(command)

        def forward(signum: int, _frame: FrameType | None) -> None:
            proc.send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        status = proc.wait()
        job.terminate()  # what it left running goes with it, and is counted
        acct = job.accounting()
        events = [e.as_dict() for e in job.events()]
    code = status if status >= 0 else 128 - status
    wall = time.monotonic() - started
    report = {**asdict(acct), "exit_code": code, "job": job.name, "events": events,
              "wall_s": round(wall, 3), "cpus": job.ncpu,
              "limits": {k: v for k, v in asdict(lim).items() if v not in (None, (), [])}}
    if fmt == "json":
        click.echo(json.dumps(report, sort_keys=True), err=True)
    else:
        _print_table(report)
    sys.stdout.flush()
    return code


def _print_table(report: dict[str, object]) -> None:
    kinds: dict[str, int] = {}
    oom_pids: list[str] = []
    for ev in report["events"]:  # type: ignore[attr-defined]
        kinds[ev["kind"]] = kinds.get(ev["kind"], 0) + 1
        if ev["kind"] == "oom_kill" and ev["pid"] is not None:
            oom_pids.append(str(ev["pid"]))
    cpu = float(report["cpu_user_s"]) + float(report["cpu_kernel_s"])  # type: ignore[arg-type]
    wall = float(report["wall_s"])  # type: ignore[arg-type]
    share = cpu / (wall * int(report["cpus"])) * 100 if wall > 0 else 0.0  # type: ignore[call-overload]
    lines = [
        f"job {report['job']}: exit code {report['exit_code']} after {wall:.2f}s",
        f"  cpu        user {report['cpu_user_s']:.3f}s  kernel {report['cpu_kernel_s']:.3f}s"
        f"  = {share:.1f}% of the machine  throttled periods {report['cpu_throttled_periods']}",
        f"  memory     peak {report['memory_peak_bytes']} bytes  page faults "
        f"{report['page_faults']}",
        f"  processes  total {report['total_processes']}  terminated "
        f"{report['terminated_processes']}  killed by a limit {report['killed_by_limit']}",
        f"  io         read {report['io_read_bytes']} B / {report['io_read_ops']} ops  write "
        f"{report['io_write_bytes']} B / {report['io_write_ops']} ops",
        "  events     " + (", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"),
    ]
    if oom_pids:
        lines.append(f"  oom killed pid {', '.join(oom_pids)}")
    click.echo("\n".join(lines), err=True)
