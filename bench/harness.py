"""The benchmark harness: time commands in interleaved rounds, summarise, write results.

A benchmark module describes what it compares as `Scenario` objects and hands them to
`measure()`, which returns a `Report`; ``python -m bench`` writes it to
``bench/results/<name>.json`` and ``.md`` and prints the table.

How `measure()` times things, so that no scenario is flattered:

- a scenario that cannot run here (a tool missing, a probe command failing) is reported
  as "not available" with the reason, and the others still run;
- every scenario first runs ``warmup`` times untimed (page cache of the inputs, the tools'
  binaries and Python imports are then warm for every side alike; the page cache is never
  dropped, since that needs privileges and a quiet machine that cannot be relied on);
- each round then runs every scenario once, in an order rotated from round to round;
- each run gets a fresh, empty work directory (pass it as the destination, ISOBOX_ROOT,
  ...), prepared untimed and deleted untimed after the run; ``sync`` runs untimed before
  every timed run so one run's writeback is not billed to the next;
- a scenario's time for a round is the sum of its steps' wall times; each step's own
  times are kept too;
- a step that exits non-zero marks its scenario "failed" with the command's stderr.

A step is a command (``argv``: a new process, timed from fork to exit) or, for what
runs inside the benchmark's own warm Python process (an SDK call), a callable
(``call``): its wall time from call to return is the step's time; an exception it
raises marks the scenario "failed" with the exception's text. ``timeout`` applies to
commands only: a call has to bound its own wait.

A scenario whose preconditions were checked by the benchmark itself (a peer daemon that
did not start) can be handed to `measure()` with ``unavailable`` set: it is reported
"not available" with that reason, like a missing tool.

Statistics: min, median, p95 by nearest rank (the ceil(0.95 * n)-th smallest), and the
ratio of each scenario's median to the baseline scenario's median (> 1: slower than the
baseline).

Adding a scenario is a few lines::

    Scenario("crun run", lambda d: [Step("crun run", ["crun", "run", "-b", BUNDLE, d.name])],
             requires=["crun"], versions={"crun": ["crun", "--version"]})
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"
SCHEMA_VERSION = 1

OK = "ok"
NOT_AVAILABLE = "not available"
FAILED = "failed"


@dataclass(frozen=True)
class Config:
    """How a run of the benchmarks was asked for (``python -m bench`` fills it)."""

    rounds: int = 5
    warmup: int = 1
    tmpdir: Path | None = None  # where work directories go (default: tempfile's)

    @classmethod
    def from_env(cls) -> Config:
        return cls(
            rounds=int(os.environ.get("BENCH_ROUNDS", "5")),
            warmup=int(os.environ.get("BENCH_WARMUP", "1")),
            tmpdir=Path(os.environ["BENCH_TMPDIR"]) if os.environ.get("BENCH_TMPDIR") else None,
        )


@dataclass(frozen=True)
class Step:
    """One timed command of a run, or one timed in-process call (``argv`` left empty)."""

    label: str
    argv: Sequence[str | Path] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # added to the environment
    timeout: float = 900.0  # commands only
    call: Callable[[], object] | None = None  # timed in this process instead of a command

    def __post_init__(self) -> None:
        if (self.call is None) == (not self.argv):
            raise ValueError(f"step {self.label!r}: give either argv or call, not both/none")


@dataclass
class Scenario:
    """One way of doing the thing a benchmark measures."""

    name: str
    steps: Callable[[Path], Sequence[Step]]  # given the run's fresh, empty work directory
    requires: Sequence[str | Path] = ()  # executables (names on PATH, or paths)
    probe: Sequence[str | Path] | None = None  # must exit 0, else "not available"
    versions: Mapping[str, Sequence[str | Path]] = field(default_factory=dict)
    baseline: bool = False  # the one the ratios are computed against
    prepare: Callable[[Path], None] | None = None  # untimed, before each run
    output: Callable[[Path], Path] | None = None  # what a run produced: sized once
    unavailable: str | None = None  # set: reported "not available" with this reason


@dataclass(frozen=True)
class Stats:
    n: int
    min: float
    median: float
    p95: float
    mean: float
    stdev: float

    @classmethod
    def of(cls, times: Sequence[float]) -> Stats:
        ordered = sorted(times)
        return cls(
            n=len(ordered),
            min=ordered[0],
            median=statistics.median(ordered),
            p95=percentile(ordered, 95),
            mean=statistics.fmean(ordered),
            stdev=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        )


def percentile(times: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the ceil(pct/100 * n)-th smallest value."""
    ordered = sorted(times)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Outcome:
    """What happened to one scenario."""

    name: str
    baseline: bool
    status: str = OK
    reason: str = ""
    times: list[float] = field(default_factory=list)  # seconds, one per round
    step_times: dict[str, list[float]] = field(default_factory=dict)
    output_bytes: int | None = None
    output_files: int | None = None

    @property
    def stats(self) -> Stats | None:
        return Stats.of(self.times) if self.status == OK and self.times else None

    def step_stats(self) -> dict[str, Stats]:
        if self.status != OK:
            return {}
        return {label: Stats.of(t) for label, t in self.step_times.items() if t}


@dataclass
class Report:
    benchmark: str
    title: str
    rounds: int
    warmup: int
    outcomes: list[Outcome]
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    baseline_label: str = "isobox"

    @property
    def baseline(self) -> Outcome | None:
        return next((o for o in self.outcomes if o.baseline), None)

    def ratio(self, o: Outcome) -> float | None:
        base = self.baseline
        s, b = o.stats, base.stats if base else None
        if s is None or b is None or b.median <= 0:
            return None
        return s.median / b.median

    @property
    def failed(self) -> bool:
        return any(o.status == FAILED for o in self.outcomes)

    def to_json(self) -> dict[str, Any]:
        scenarios = []
        for o in self.outcomes:
            st = o.stats
            scenarios.append(
                {
                    "name": o.name,
                    "baseline": o.baseline,
                    "status": o.status,
                    "reason": o.reason,
                    "times_s": o.times,
                    "stats_s": dataclasses.asdict(st) if st else None,
                    "ratio_vs_baseline": self.ratio(o),
                    "steps": {
                        label: {"times_s": o.step_times[label], "stats_s": dataclasses.asdict(s)}
                        for label, s in o.step_stats().items()
                    },
                    "output": {"bytes": o.output_bytes, "files": o.output_files},
                }
            )
        return {
            "schema": SCHEMA_VERSION,
            "benchmark": self.benchmark,
            "title": self.title,
            "date": self.date,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "baseline": self.baseline.name if self.baseline else None,
            "machine": self.machine,
            "tools": self.tools,
            "params": self.params,
            "notes": self.notes,
            "scenarios": scenarios,
        }

    def table(self) -> str:
        """The markdown table: scenario | min | median | p95 | ratio."""
        lines = [
            f"| scenario | min | median | p95 | ratio vs {self.baseline_label} |",
            "|---|---:|---:|---:|---:|",
        ]
        for o in self.outcomes:
            st = o.stats
            if st is None:
                why = f"{o.status}: {o.reason}" if o.reason else o.status
                lines.append(f"| {o.name} | {_md(why)} | | | |")
                continue
            r = self.ratio(o)
            ratio = f"{r:.2f}x" if r is not None else "n/a"
            lines.append(
                f"| {o.name} | {fmt_s(st.min)} | {fmt_s(st.median)} | {fmt_s(st.p95)} | {ratio} |"
            )
            steps = o.step_stats()
            if len(steps) > 1:
                for label, s in steps.items():
                    lines.append(
                        f"| ↳ {label} | {fmt_s(s.min)} | {fmt_s(s.median)} | {fmt_s(s.p95)} | |"
                    )
        return "\n".join(lines)

    def to_markdown(self) -> str:
        m = self.machine
        out = [
            f"# {self.benchmark}: {self.title}",
            "",
            f"{self.date} · {m.get('os', '?')} · kernel {m.get('kernel', '?')} · "
            f"{m.get('nproc', '?')} cores · {m.get('cpu', '?')}",
            "",
            f"{self.rounds} rounds after {self.warmup} untimed warm-up run(s) per scenario, "
            "interleaved (order rotated every round), each run on fresh directories.",
            "",
            self.table(),
            "",
        ]
        if self.notes:
            out += ["Notes:", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.params:
            out += ["Parameters:", ""]
            out += [f"- {k}: {v}" for k, v in self.params.items()] + [""]
        if self.tools:
            out += ["Tools:", ""] + [f"- {k}: {v}" for k, v in self.tools.items()] + [""]
        return "\n".join(out)


def fmt_s(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.2f} s"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    return f"{seconds * 1000:.1f} ms"


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- running --------------------------------------------------------------------------


class StepFailed(Exception):
    pass


def _unavailable(s: Scenario) -> str | None:
    """Why a scenario cannot run here, or None."""
    if s.unavailable is not None:
        return s.unavailable
    for exe in s.requires:
        p = Path(exe)
        found = (
            (p.is_file() and os.access(p, os.X_OK))
            if p.is_absolute()
            else (shutil.which(str(exe)) is not None)
        )
        if not found:
            return f"{exe} is not installed"
    if s.probe is not None:
        argv = [str(a) for a in s.probe]
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(argv)}`: {exc}"
        if proc.returncode != 0:
            return f"`{' '.join(argv)}` exited {proc.returncode}: {_tail(proc.stderr)}"
    return None


def _tail(text: str, n: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "(no output)")[-n:]


def tool_version(argv: Sequence[str | Path]) -> str:
    """The first line a version command prints, or why there is none."""
    try:
        proc = subprocess.run(
            [str(a) for a in argv],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    if proc.returncode != 0 or not text:
        return f"unknown (exit {proc.returncode})"
    return text[0].strip()


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    return [f.split()[4] for f in lines if (f.split()[4] + "/").startswith(prefix)]


def _remove(workdir: Path) -> None:
    mounted = _mounts_under(workdir)
    if mounted:  # never recurse into a mount: it may be a bind of something real
        raise StepFailed(f"left mounted after the run, not removing {workdir}: {mounted[:3]}")
    try:
        shutil.rmtree(workdir)
    except OSError as exc:
        raise StepFailed(f"cannot remove the run's work directory: {exc}") from exc


def _size(path: Path) -> tuple[int, int]:
    """Bytes allocated on disk and entries under a path (not following symlinks)."""
    total = files = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total, files


def _run_once(
    s: Scenario, base: Path, size_output: bool
) -> tuple[float, dict[str, float], tuple[int, int] | None]:
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    try:
        if s.prepare is not None:
            s.prepare(workdir)
        steps = s.steps(workdir)
        os.sync()
        per_step: dict[str, float] = {}
        for step in steps:
            if step.call is not None:
                t0 = time.perf_counter()
                try:
                    step.call()
                except Exception as exc:
                    raise StepFailed(f"{step.label}: {type(exc).__name__}: {exc}") from exc
                elapsed = time.perf_counter() - t0
                per_step[step.label] = per_step.get(step.label, 0.0) + elapsed
                continue
            argv = [str(a) for a in step.argv]
            env = {**os.environ, **step.env}
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=step.timeout,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise StepFailed(f"{step.label}: `{' '.join(argv)}`: {exc}") from exc
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                err = _tail(
                    proc.stderr.decode(errors="replace") or proc.stdout.decode(errors="replace")
                )
                raise StepFailed(
                    f"{step.label}: `{' '.join(argv)}` exited {proc.returncode}: {err}"
                )
            per_step[step.label] = per_step.get(step.label, 0.0) + elapsed
        sized = _size(s.output(workdir)) if size_output and s.output is not None else None
        return sum(per_step.values()), per_step, sized
    finally:
        _remove(workdir)


def measure(
    benchmark: str,
    title: str,
    scenarios: Sequence[Scenario],
    config: Config,
    *,
    params: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    extra_tools: Mapping[str, Sequence[str | Path]] | None = None,
) -> Report:
    """Run every available scenario ``config.warmup`` times untimed, then
    ``config.rounds`` interleaved timed rounds; see the module docstring."""
    if sum(s.baseline for s in scenarios) > 1:
        raise ValueError("at most one scenario can be the baseline")
    outcomes = {s.name: Outcome(s.name, s.baseline) for s in scenarios}
    tools: dict[str, str] = {}
    for name, argv in (extra_tools or {}).items():
        tools[name] = tool_version(argv)
    active: list[Scenario] = []
    for s in scenarios:
        why = _unavailable(s)
        if why is not None:
            outcomes[s.name].status, outcomes[s.name].reason = NOT_AVAILABLE, why
            log(f"{benchmark}: {s.name}: not available: {why}")
            continue
        active.append(s)
        for tool, argv in s.versions.items():
            tools.setdefault(tool, tool_version(argv))

    def fail(s: Scenario, exc: StepFailed) -> None:
        outcomes[s.name].status, outcomes[s.name].reason = FAILED, str(exc)
        log(f"{benchmark}: {s.name}: FAILED: {exc}")
        active.remove(s)

    if config.tmpdir is not None:
        config.tmpdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"isobox-bench-{benchmark}-", dir=config.tmpdir) as tmp:
        base = Path(tmp)
        for w in range(config.warmup):
            for s in list(active):
                log(f"{benchmark}: warm-up {w + 1}/{config.warmup}: {s.name}")
                try:
                    _, _, sized = _run_once(s, base, size_output=w == 0)
                except StepFailed as exc:
                    fail(s, exc)
                    continue
                if sized is not None:
                    outcomes[s.name].output_bytes, outcomes[s.name].output_files = sized
        for r in range(config.rounds):
            order = active[r % len(active) :] + active[: r % len(active)] if active else []
            for s in order:
                try:
                    total, per_step, _ = _run_once(s, base, size_output=False)
                except StepFailed as exc:
                    fail(s, exc)
                    continue
                o = outcomes[s.name]
                o.times.append(total)
                for label, t in per_step.items():
                    o.step_times.setdefault(label, []).append(t)
                log(f"{benchmark}: round {r + 1}/{config.rounds}: {s.name}: {fmt_s(total)}")

    baseline = next((s for s in scenarios if s.baseline), None)
    return Report(
        benchmark=benchmark,
        title=title,
        rounds=config.rounds,
        warmup=config.warmup,
        outcomes=[outcomes[s.name] for s in scenarios],
        params=dict(params or {}),
        notes=list(notes),
        tools=tools,
        machine=machine_info(),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        baseline_label=baseline.name.split()[0] if baseline else "baseline",
    )


# --- machine and results --------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def write_report(report: Report, results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``<benchmark>.json`` and ``<benchmark>.md``, each atomically."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in (
        (".json", json.dumps(report.to_json(), indent=2) + "\n"),
        (".md", report.to_markdown()),
    ):
        path = results_dir / f"{report.benchmark}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]
