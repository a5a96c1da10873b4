"""Memory of idle ``--isolation=vm`` containers started as template clones: PSS per QEMU
at N = 1, 10, 50 (issue 8's goal: at most 40 MiB per idle VM at 50).

One ``isoboxd`` (its folders in a short folder under /tmp, its template on tmpfs in a
folder of the benchmark's own, built untimed by one clone run first) starts
``isobox run -d --isolation=vm --network none busybox sleep 3600`` one at a time until N
run (the counts are cumulative: from 1 to 10 nine more are started, and so on). At each N,
after a settle time with every VM idle, for each container's QEMU (``qemuPid`` of its
``vm.json``, which must say ``mode: clone``):

* ``/proc/<pid>/smaps_rollup``: Pss, Pss_Anon, Pss_File, Pss_Shmem, Rss, Private
  (Private_Clean + Private_Dirty), AnonHugePages;
* ``/proc/<pid>/smaps``, each mapping's Pss attributed to: the template's RAM file (the
  pages still shared with the file, and the guest pages this clone copied on write: that
  mapping's ``Anonymous``), the TCG code cache (the anonymous executable mappings:
  ``tb-size=32``, madvised for huge pages), other anonymous memory (QEMU's heap, thread
  stacks, device buffers), the QEMU binary and its libraries, and the rest (the kernel and
  initrd files QEMU maps, vdso, ...);
* the template's RAM file on tmpfs (allocated blocks): pages that stay in memory whatever
  maps them, counted once, and per VM divided by N;
* the QEMU's parent, when it is a process per container (the host monitor), reported on
  its own: it is the container's, not the VM's;
* the QEMUs' CPU use during the settle time (an idle VM's cost on a 2-core host) and the
  host's MemAvailable drop since before the first VM, per VM.

At the largest N, ``isobox exec <id> true`` in every container once: all must answer. Then
every container is removed and no QEMU of the benchmark may be left.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import REPO, Config, Report, fmt_s, log, machine_info, tool_version
from bench.peers import IsoboxDaemon, PeerError, cpu_seconds, environ, venv_bin
from bench.vm_start import VmBench, build_template, prepare_vm_assets, qemus, template_summary

NAME = "vm_memory"
TITLE = "memory of N idle --isolation=vm containers (template clones): PSS per QEMU"
GOAL_PSS_MIB = 40.0
COUNTS = (1, 10, 50)
SETTLE_S = 10.0
MIB = 1024  # smaps counts kB

ROLLUP = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss", "Private", "AnonHugePages")
CATEGORIES = ("template RAM, shared", "template RAM, copied on write", "TCG code cache",
              "QEMU heap", "other anonymous", "QEMU binary + libs", "other")


def counts_from_env() -> list[int]:
    raw = os.environ.get("BENCH_VM_COUNTS", "")
    counts = sorted({int(x) for x in raw.split(",") if x.strip()}) if raw else list(COUNTS)
    if not counts or counts[0] < 1:
        raise ValueError(f"BENCH_VM_COUNTS={raw!r}: give counts >= 1, e.g. 1,10,50")
    return counts


# ---- /proc --------------------------------------------------------------------------------


def rollup(pid: int) -> dict[str, int]:
    """kB of the smaps_rollup fields, with Private = Private_Clean + Private_Dirty."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    out["Private"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$")


@dataclass
class Mapping:
    perms: str
    path: str
    fields: dict[str, int] = field(default_factory=dict)


def mappings(pid: int) -> list[Mapping]:
    maps: list[Mapping] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _HEADER.match(line)
        if m:
            maps.append(Mapping(m[1], m[2]))
            continue
        key, _, value = line.partition(":")
        if maps and value.strip().endswith("kB"):
            maps[-1].fields[key] = int(value.split()[0])
    return maps


def attribute(maps: Sequence[Mapping], template_dir: Path, qemu: str) -> tuple[
        dict[str, int], dict[str, int], list[tuple[int, int, str]]]:
    """kB of Pss per category; the "other" mappings' Pss by path; the anonymous mappings
    of "other anonymous" as (size, Pss, perms), largest Pss first."""
    cats = dict.fromkeys(CATEGORIES, 0)
    other: dict[str, int] = {}
    anon: list[tuple[int, int, str]] = []
    tdir = str(template_dir)
    for m in maps:
        pss = m.fields.get("Pss", 0)
        anonymous = not m.path or (m.path.startswith("[")
                                   and m.path not in {"[vdso]", "[vvar]", "[vsyscall]"})
        if m.path.startswith(tdir):
            copied = min(pss, m.fields.get("Anonymous", 0))
            cats["template RAM, copied on write"] += copied
            cats["template RAM, shared"] += pss - copied
        elif anonymous and "x" in m.perms:
            cats["TCG code cache"] += pss
        elif m.path == "[heap]":
            cats["QEMU heap"] += pss
        elif anonymous:
            cats["other anonymous"] += pss
            anon.append((m.fields.get("Size", 0), pss, f"{m.perms} {m.path}".strip()))
        elif m.path == qemu or ".so" in m.path.rsplit("/", 1)[-1]:
            cats["QEMU binary + libs"] += pss
        else:
            cats["other"] += pss
            other[m.path] = other.get(m.path, 0) + pss
    anon.sort(key=lambda a: -a[1])
    return cats, other, anon


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def mem_available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


# ---- the report ---------------------------------------------------------------------------


@dataclass
class MemoryReport(Report):
    """A `Report` whose body is memory per VM at each N instead of timed scenarios."""

    levels: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["levels"] = self.levels
        out["problems"] = self.problems
        return out

    def table(self) -> str:
        if not self.levels:
            return "(no level measured)\n\n" + "\n".join(f"- {p}" for p in self.problems)
        mib = "MiB per VM: mean / median"
        lines = [
            "| N | Pss | Pss_Anon | Pss_File | Pss_Shmem | Rss | Private | AnonHuge"
            " | template RAM file (once) | / N | Pss - shared template + file / N"
            " | host monitor Pss |",
            "|---:|" + "---:|" * 11,
        ]
        for lv in self.levels:
            r = lv["rollup_mib"]
            cells = [f"{r[k]['mean']:.1f} / {r[k]['median']:.1f}" for k in ROLLUP]
            mon = lv.get("monitor_pss_mib")
            lines.append(
                f"| {lv['n']} | " + " | ".join(cells) + f" | {lv['template_ram_mib']:.1f} | "
                f"{lv['template_ram_mib'] / lv['n']:.1f} | {lv['effective_mib']:.1f} | "
                + (f"{mon['mean']:.1f} / {mon['median']:.1f}" if mon else "none") + " |")
        lines += ["", f"({mib}; the template RAM file in MiB.)", "",
                  "Where each QEMU's Pss goes (MiB per VM, mean):", "",
                  "| N | " + " | ".join(CATEGORIES) + " | total Pss |",
                  "|---:|" + "---:|" * (len(CATEGORIES) + 1)]
        for lv in self.levels:
            c = lv["categories_mib"]
            lines.append(f"| {lv['n']} | " + " | ".join(f"{c[k]:.1f}" for k in CATEGORIES)
                         + f" | {sum(c.values()):.1f} |")
        lines += ["", "| N | clone start (`run -d`) median | QEMU CPU idle, per VM | "
                  "host MemAvailable drop per VM |", "|---:|---:|---:|---:|"]
        for lv in self.levels:
            start = lv["start_s"]
            lines.append(f"| {lv['n']} | {fmt_s(start['median']) if start else 'n/a'} | "
                         f"{lv['idle_cpu_pct_per_vm']:.1f}% | "
                         f"{lv['mem_available_drop_mib_per_vm']:.1f} MiB |")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        m = self.machine
        out = [f"# {self.benchmark}: {self.title}", "",
               f"{self.date} · {m.get('os', '?')} · kernel {m.get('kernel', '?')} · "
               f"{m.get('nproc', '?')} cores · {m.get('mem_gib', '?')} GiB · "
               f"{m.get('cpu', '?')}", "", self.table(), ""]
        if self.problems:
            out += ["Problems:", ""] + [f"- {p}" for p in self.problems] + [""]
        if self.notes:
            out += ["Notes:", ""] + [f"- {n}" for n in self.notes] + [""]
        if self.params:
            out += ["Parameters:", ""] + [f"- {k}: {v}" for k, v in self.params.items()] + [""]
        if self.tools:
            out += ["Tools:", ""] + [f"- {k}: {v}" for k, v in self.tools.items()] + [""]
        return "\n".join(out)


# ---- the run ------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The idle VM containers started so far and what each start took."""

    d: IsoboxDaemon
    ids: list[str] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)

    def grow(self, n: int) -> list[float]:
        took = []
        while len(self.ids) < n:
            t0 = time.perf_counter()
            cid = self.d.isobox("run", "-d", "--isolation=vm", "--network", "none", "busybox",
                                "sleep", "3600").strip()
            took.append(time.perf_counter() - t0)
            self.ids.append(cid)
            if len(self.ids) % 10 == 0 or len(self.ids) == n:
                log(f"{NAME}: {len(self.ids)} VMs running")
        self.start_s += took
        return took

    def info(self, cid: str) -> dict[str, Any]:
        return dict(json.loads((self.d.root / "containers" / cid / "vm.json").read_text()))

    def remove(self) -> list[str]:
        problems = []
        for i in range(0, len(self.ids), 10):
            chunk = self.ids[i:i + 10]
            try:
                self.d.isobox("rm", "-f", *chunk)
            except PeerError as exc:
                problems.append(f"rm -f of {len(chunk)} containers: {exc}")
        self.ids.clear()
        return problems


def measure_level(fleet: Fleet, n: int, took: list[float], *, template_dir: Path,
                  template_ram: Path, avail0: int, settle: float,
                  problems: list[str]) -> dict[str, Any]:
    infos = {cid: fleet.info(cid) for cid in fleet.ids}
    not_clone = {cid[:12]: (i.get("mode"), i.get("coldReason")) for cid, i in infos.items()
                 if i.get("mode") != "clone"}
    if not_clone:
        problems.append(f"N={n}: {len(not_clone)} VMs were not clones: {not_clone}")
    pids = {cid: int(i["qemuPid"]) for cid, i in infos.items()}
    cpu0 = cpu_seconds(list(pids.values()))
    t0 = time.monotonic()
    log(f"{NAME}: N={n}: settling {settle:.0f} s")
    time.sleep(settle)
    cpu1 = cpu_seconds(list(pids.values()))
    window = time.monotonic() - t0
    idle_cpu = sum(cpu1.get(p, 0.0) - cpu0.get(p, 0.0) for p in pids.values())
    gone = [cid[:12] for cid, p in pids.items() if p not in cpu1]
    if gone:
        problems.append(f"N={n}: QEMU gone for {gone}")

    qemu = str(Path(os.path.realpath(Path(f"/proc/{next(iter(pids.values()))}/exe"))))
    rolls, cats = [], []
    others: dict[str, int] = {}
    monitors: dict[int, dict[str, int]] = {}
    daemon_pid = fleet.d.proc.pid if fleet.d.proc else -1
    anon: list[tuple[int, int, str]] = []
    for pid in pids.values():
        rolls.append(rollup(pid))
        c, other, anon_maps = attribute(mappings(pid), template_dir, qemu)
        cats.append(c)
        anon = anon or anon_maps  # the first VM's, as an example
        for path, kb in other.items():
            others[path] = others.get(path, 0) + kb
        with contextlib.suppress(OSError):
            pp = parent(pid)
            if pp != daemon_pid and pp not in monitors:
                monitors[pp] = rollup(pp)
    ram_kb = template_ram.stat().st_blocks // 2
    roll_mib = {k: _stats([r.get(k, 0) / MIB for r in rolls]) for k in ROLLUP}
    cats_mib = {k: statistics.fmean(c[k] for c in cats) / MIB for k in CATEGORIES}
    shared = cats_mib["template RAM, shared"]
    top_other = sorted(others.items(), key=lambda kv: -kv[1])[:3]
    level = {
        "n": n,
        "rollup_mib": roll_mib,
        "categories_mib": cats_mib,
        "other_largest_mib_per_vm": {p: round(kb / n / MIB, 2) for p, kb in top_other},
        "other_anonymous_example": {
            "mappings": len(anon),
            "largest (size MiB, Pss MiB)": [(round(sz / MIB, 2), round(p / MIB, 2))
                                            for sz, p, _ in anon[:8]]},
        "template_ram_mib": ram_kb / MIB,
        "effective_mib": roll_mib["Pss"]["mean"] - shared + ram_kb / MIB / n,
        "monitor_pss_mib": (_stats([r["Pss"] / MIB for r in monitors.values()])
                            if monitors else None),
        "monitors": len(monitors),
        "start_s": _stats(took) if took else None,
        "idle_cpu_pct_per_vm": 100 * idle_cpu / window / n,
        "idle_cpu_pct_total": 100 * idle_cpu / window,
        "mem_available_drop_mib_per_vm": (avail0 - mem_available_kb()) / MIB / n,
        "accel": sorted({str(i.get("accel")) for i in infos.values()}),
        "templates": sorted({str(i.get("template")) for i in infos.values()}),
    }
    log(f"{NAME}: N={n}: Pss mean {roll_mib['Pss']['mean']:.1f} MiB, median "
        f"{roll_mib['Pss']['median']:.1f} MiB; template RAM file {ram_kb / MIB:.0f} MiB")
    return level


def exec_all(fleet: Fleet) -> dict[str, Any]:
    took, failed = [], []
    for cid in fleet.ids:
        t0 = time.perf_counter()
        try:
            fleet.d.isobox("exec", cid, "true")
        except PeerError as exc:
            failed.append(f"{cid[:12]}: {str(exc)[-200:]}")
            continue
        took.append(time.perf_counter() - t0)
    return {"n": len(fleet.ids), "answered": len(took), "failed": failed,
            "seconds": _stats(took) if took else None}


def run(config: Config) -> Report:
    del config  # one measurement per N; rounds and warm-up do not apply
    counts = counts_from_env()
    settle = float(os.environ.get("BENCH_VM_SETTLE", SETTLE_S))
    problems: list[str] = []
    levels: list[dict[str, Any]] = []
    notes: list[str] = []
    params: dict[str, Any] = {"counts": counts, "settle before measuring (s)": settle,
                              "container": "isobox run -d --isolation=vm --network none "
                                           "busybox sleep 3600",
                              "vm": "QEMU microvm, 512 MiB, 1 vCPU (the defaults)"}
    with contextlib.suppress(OSError):
        params["transparent huge pages"] = Path(
            "/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    with VmBench.make("ibmem-") as vb, environ(vb.env):
        accel, reason = prepare_vm_assets(NAME)
        params["accelerator"] = f"{accel}: {reason}"
        d = IsoboxDaemon(vb.folder / "isobox", venv_bin("isoboxd"), venv_bin("isobox"))
        fleet = Fleet(d)
        try:
            d.start()
            d.isobox("image", "bootstrap", "busybox")
            meta = build_template(d, vb.template_dir, NAME)
            ram = vb.template_dir / meta["key"] / "ram"
            avail0 = mem_available_kb()
            for n in counts:
                took = fleet.grow(n)
                levels.append(measure_level(fleet, n, took, template_dir=vb.template_dir,
                                            template_ram=ram, avail0=avail0, settle=settle,
                                            problems=problems))
            ex = exec_all(fleet)
            levels[-1]["exec"] = ex
            if ex["answered"] != ex["n"]:
                problems.append(f"exec at N={ex['n']}: {ex['n'] - ex['answered']} did not "
                                f"answer: {ex['failed'][:5]}")
            params["template"] = template_summary(meta, ram)
        except Exception as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
            log(f"{NAME}: FAILED: {exc}")
        finally:
            log(f"{NAME}: removing {len(fleet.ids)} containers")
            problems += fleet.remove()
            time.sleep(1)
            left = qemus(str(vb.folder))
            if left:
                problems.append(f"QEMU left after every container was removed: {left}")
            problems += [f"LEFTOVER: {x}" for x in d.stop()]
            problems += [f"LEFTOVER: {x}" for x in vb.leftovers()]
    if vb.template_dir.exists():
        problems.append(f"LEFTOVER: template folder {vb.template_dir}")

    if levels:
        last = levels[-1]
        done = last.get("exec")
        if done:
            s = done["seconds"]
            notes.append(f"exec at N={done['n']}: {done['answered']} of {done['n']} "
                         f"containers answered `isobox exec <id> true`"
                         + (f" (median {fmt_s(s['median'])}, max {fmt_s(s['max'])})"
                            if s else ""))
        notes.append("All VMs at every N were clones (vm.json mode=clone) of one template; "
                     f"accelerator {', '.join(last['accel'])}."
                     if not any("not clones" in p for p in problems)
                     else "NOT every VM was a clone: see Problems.")
        ex_anon = last["other_anonymous_example"]
        notes.append(f"'other anonymous' of one VM at N={last['n']}: {ex_anon['mappings']} "
                     "anonymous mappings (thread stacks, TCG's translation-block tables, "
                     "device and block-layer buffers, ...), the largest as (size MiB, Pss "
                     f"MiB): {ex_anon['largest (size MiB, Pss MiB)']}.")
        notes.append(f"'other' (per VM, MiB, at N={last['n']}): "
                     f"{last['other_largest_mib_per_vm']} (the kernel and initrd files "
                     "QEMU maps for -kernel/-initrd, vdso).")
        notes.append("host monitor: each VM container's QEMU is the child of a host "
                     "process of its own (a monitor, not isoboxd): "
                     + ", ".join(f"{lv['monitors']} at N={lv['n']}" for lv in levels)
                     + "; its Pss is the container's cost on top of the VM's.")
        notes.append("Pss counts each shared page once across its mappers, so the "
                     "template's pages that no clone maps (still in tmpfs) are in no Pss: "
                     "'Pss - shared template + file / N' replaces each VM's share of the "
                     "template pages by the whole file divided by N (the host's cost per "
                     "VM, QEMU only).")
        notes.append(
            f"Goal Pss per idle VM <= {GOAL_PSS_MIB:g} MiB at N={last['n']}: mean "
            f"{last['rollup_mib']['Pss']['mean']:.1f} MiB, median "
            f"{last['rollup_mib']['Pss']['median']:.1f} MiB -> "
            + ("met" if last['rollup_mib']['Pss']['mean'] <= GOAL_PSS_MIB else "NOT met")
            + ("" if last["n"] >= 50 else " (N below 50: not the goal's N)"))
    if not problems:
        notes.insert(0, "After the run every container was removed and isoboxd stopped: no "
                        "QEMU, process, mount or template of the benchmark was left.")
    tools = {"isobox commit": tool_version(["git", "-C", REPO, "describe", "--always",
                                            "--dirty"]),
             "qemu": tool_version(["qemu-system-x86_64", "--version"])}
    return MemoryReport(
        benchmark=NAME, title=TITLE, rounds=1, warmup=0, outcomes=[], params=params,
        notes=notes, tools=tools, machine=machine_info(),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), levels=levels,
        problems=problems)
