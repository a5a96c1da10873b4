"""``isobox job run``: a host command in a fresh Job, its accounting printed at exit.

Signals and the terminal, as a shell does for a foreground job. The command runs in a
process group of its own. When isobox's stdin is a terminal whose foreground process group
is isobox's, the command's group is given the terminal for as long as it runs (and isobox's
group gets it back after), so a Ctrl-C or Ctrl-\\ at the terminal reaches the command's
processes once, from the kernel, and a Ctrl-Z stops the command and then isobox, which gives
the terminal back to the command when it is continued. SIGINT, SIGTERM and SIGHUP sent to
isobox itself are forwarded to the command's process group, once.

(Because the terminal then belongs to the command's group alone, a program after isobox in
the same pipeline that reads the terminal — ``isobox job run -- cmd | less`` — is stopped
while the command runs: redirect isobox's stdin (``< /dev/null``) in that case.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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
        except OSError as exc:
            raise InvalidArgument(f"--io-{key.replace('_', '-')} {spec!r}: {dev}: "
                                  f"{exc.strerror or exc}") from exc
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
    tty = _foreground_terminal()
    with Job(name, limits=lim) as job:
        with _forwarding() as target:
            proc = job.spawn(command, process_group=0, before_start=(
                (lambda pid: _give_terminal(tty, pid)) if tty is not None else None))
            target.append(proc.pid)
            try:
                status = _wait(proc, tty)
            finally:
                if tty is not None:
                    _give_terminal(tty, os.getpgrp())
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


def _foreground_terminal() -> int | None:
    """fd 0 if it is a terminal whose foreground process group is ours, else None."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            return 0
    except OSError:
        pass
    return None


def _give_terminal(fd: int, pgid: int) -> None:
    """Make ``pgid`` the terminal's foreground group. A background group (isobox, while
    the command has the terminal) that calls tcsetpgrp gets SIGTTOU: ignored around it."""
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, pgid)
    finally:
        signal.signal(signal.SIGTTOU, old)


@contextlib.contextmanager
def _forwarding() -> Iterator[list[int]]:
    """While inside: SIGINT/SIGTERM/SIGHUP sent to isobox go, once, to the process group
    of the pid put in the yielded list (the command's; nothing before it exists)."""
    target: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if not target:
            return
        try:
            os.killpg(target[0], signum)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(target[0], signum)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, forward) for sig in sigs}
    try:
        yield target
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _wait(proc: subprocess.Popen[bytes], tty: int | None) -> int:
    """The command's exit status (negative: killed by that signal). With a terminal, a
    stop of the command (Ctrl-Z) stops isobox too, as a shell's job control expects; on
    continue the command gets the terminal back and is continued."""
    if tty is None:
        return int(proc.wait())
    while True:
        _pid, status = os.waitpid(proc.pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            _give_terminal(tty, os.getpgrp())
            os.kill(os.getpid(), signal.SIGSTOP)  # our shell sees the job stopped
            # Continued. With ``fg`` our shell gave us the terminal: pass it on. With
            # ``bg`` it did not: the command goes on in the background (reading the
            # terminal stops it again, and us with it).
            with contextlib.suppress(OSError):
                if os.tcgetpgrp(tty) == os.getpgrp():
                    _give_terminal(tty, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
            continue
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
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
