"""The ``isobox`` verbs that look at containers and the daemon: ``ps``/``ls``, ``inspect``,
``logs``, ``top``, ``stats``, ``events``, ``info``."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from isobox.cli.common import client, moment
from isobox.cli.format import FORMAT, ago, duration, emit_json, human_binary, parse_time, table
from isobox.errors import InvalidArgument, NotFound

if TYPE_CHECKING:  # wire's TypedDicts are types here (building them costs ~2 ms)
    from isobox.spec.wire import ComputeSystemInfo


# ---- listing -------------------------------------------------------------------------------


def _command(info: ComputeSystemInfo) -> str:
    process = info["document"].get("process", {})
    argv = [*(process.get("entrypoint") or []), *(process.get("args") or [])]
    return " ".join(argv)


def status_text(info: ComputeSystemInfo) -> str:
    state = info["state"]
    if state in ("running", "paused"):
        started = parse_time(info["startedAt"])
        up = "Up " + duration(time.time() - started) if started else "Up"
        return up + (" (Paused)" if state == "paused" else "")
    if state == "stopped":
        return f"Exited ({info['exitCode']}) {ago(info['finishedAt'])}".rstrip()
    if state == "removing":
        return "Removal In Progress"
    return state.capitalize()


def _filters(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ("state", "status", "isolation", "label", "name"):
            raise InvalidArgument(
                f"bad filter {item!r}: state=, isolation=, label=KEY[=VALUE], name=")
        out.setdefault("state" if key == "status" else key, []).append(value)
    return out


@click.command()
@click.option("-a", "--all", "all_", is_flag=True, help="Also created and stopped ones.")
@click.option("-q", "--quiet", is_flag=True, help="Only IDs.")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="state=, isolation=, label=KEY[=VALUE], name= (repeatable).")
@click.option("--no-trunc", is_flag=True, help="Full IDs and commands.")
@FORMAT
def ps(all_: bool, quiet: bool, filters: tuple[str, ...], no_trunc: bool, fmt: str) -> None:
    """List containers (running ones unless -a), as HcsEnumerateComputeSystems."""
    query: dict[str, Any] = dict(_filters(filters))
    for key in ("isolation", "name"):
        if key in query:
            if len(query[key]) > 1:
                raise InvalidArgument(f"filter {key} may be given once")
            query[key] = query[key][0]
    cts = client().containers.list(all=all_, filters=query)
    if fmt == "json":
        emit_json([ct.attrs for ct in cts])
        return
    if quiet:
        for ct in cts:
            click.echo(ct.id if no_trunc else ct.short_id)
        return
    rows = []
    for ct in cts:
        cmd = _command(ct.attrs)
        if not no_trunc and len(cmd) > 20:
            cmd = cmd[:19] + "…"
        rows.append([ct.id if no_trunc else ct.short_id, ct.image, f'"{cmd}"',
                     ago(ct.attrs["createdAt"]), status_text(ct.attrs),
                     ct.attrs["isolation"], ct.name])
    table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "ISOLATION", "NAMES"], rows)


@click.command()
@click.option("--type", "kind", type=click.Choice(["container", "image"]),
              help="Look only for a container or only for an image.")
@click.argument("refs", nargs=-1, required=True)
def inspect(refs: tuple[str, ...], kind: str | None) -> None:
    """Show containers (or images) as JSON."""
    c = client()
    out: list[Any] = []
    for ref in refs:
        if kind != "image":
            try:
                out.append(c.containers.get(ref).attrs)
                continue
            except NotFound:
                if kind == "container":
                    raise
        out.append(c.images.get(ref).attrs)
    emit_json(out)


# ---- output, processes, stats, events ------------------------------------------------------


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
@click.option("--since", help="RFC 3339 time, unix seconds, or a duration ago (10m, 1h30m).")
@click.option("--until", help="RFC 3339 time, unix seconds, or a duration ago.")
@click.option("-n", "--tail", help="Lines from the end (or 'all').")
@click.option("-t", "--timestamps", is_flag=True)
@click.argument("ref")
def logs(ref: str, *, follow: bool, since: str | None, until: str | None, tail: str | None,
         timestamps: bool) -> None:
    """Print a container's output (stdout to stdout, stderr to stderr)."""
    ct = client().containers.get(ref)
    n = None if tail in (None, "all") else int(tail)
    entries = ct.logs(stream=True, follow=follow, since=moment(since), until=moment(until),
                      tail=n)
    assert not isinstance(entries, bytes)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for e in entries:
        line = (e["time"] + " " if timestamps else "") + e["line"]
        target = err if e["stream"] == "stderr" else out
        target.write(line.encode())
        if follow:
            target.flush()


@click.command()
@FORMAT
@click.argument("ref")
def top(ref: str, fmt: str) -> None:
    """The processes of a container."""
    procs = client().containers.get(ref).top()["processes"]
    if fmt == "json":
        emit_json(procs)
        return
    rows = [[str(p["pid"]), str(p["containerPid"]), str(p["ppid"]), str(p["uid"]), p["state"],
             _cpu_time(p["cpuTimeNs"]), human_binary(p["rssBytes"]), p["command"]]
            for p in procs]
    table(["PID", "CPID", "PPID", "UID", "STATE", "TIME", "RSS", "COMMAND"], rows)


def _cpu_time(ns: int) -> str:
    s = ns // 1_000_000_000
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


@click.command()
@click.option("--no-stream", is_flag=True, help="One sample, then exit.")
@click.option("--interval", type=float, default=1.0, show_default=True)
@FORMAT
@click.argument("refs", nargs=-1, required=True)
def stats(refs: tuple[str, ...], no_stream: bool, interval: float, fmt: str) -> None:
    """Job accounting of containers: CPU, memory, processes, I/O."""
    c = client()
    cts = [c.containers.get(r) for r in refs]
    previous: dict[str, tuple[float, int]] = {}
    # CPU % needs two samples: --no-stream takes a silent one first (docker's shows the CPU
    # of its last second too), or it would always print 0.00%.
    primed = not no_stream
    while True:
        samples = []
        for ct in cts:
            s = ct.stats()
            assert isinstance(s, dict)
            now = time.monotonic()
            if ct.id in previous:  # CPU % of one CPU since the last sample, as docker's
                t0, cpu0 = previous[ct.id]
                s["cpuPercent"] = round((s["cpuUsageNs"] - cpu0) / ((now - t0) * 1e7), 2)
            previous[ct.id] = (now, s["cpuUsageNs"])
            samples.append((ct, s))
        if not primed:
            primed = True
            time.sleep(min(interval, 0.5))
            continue
        if fmt == "json":
            emit_json([{"id": ct.id, "name": ct.name, **s} for ct, s in samples])
        else:
            table(["CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "PIDS", "BLOCK I/O"], [
                [ct.short_id, ct.name, f"{s['cpuPercent']:.2f}%",
                 f"{human_binary(s['memoryBytes'])} / "
                 f"{human_binary(s['memoryLimit']) if s['memoryLimit'] else 'unlimited'}",
                 str(s["pids"]),
                 f"{human_binary(s['ioReadBytes'])} / {human_binary(s['ioWriteBytes'])}"]
                for ct, s in samples])
        if no_stream:
            return
        sys.stdout.flush()
        time.sleep(interval)


@click.command()
@click.option("--since", help="RFC 3339 time, unix seconds, or a duration ago (10m).")
@click.option("--until", help="RFC 3339 time, unix seconds, or a duration ago (ends the "
              "stream).")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="type=, action=, id=, name=, label= (repeatable).")
@click.option("--no-follow", is_flag=True, help="Print past events, then exit.")
@FORMAT
def events(since: str | None, until: str | None, filters: tuple[str, ...], no_follow: bool,
           fmt: str) -> None:
    """Print events of containers, images and the daemon as they happen."""
    pairs: dict[str, list[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"filter must be KEY=VALUE, got {item!r}")
        pairs.setdefault(key, []).append(value)
    stream = client().events(since=moment(since), until=moment(until), filters=pairs,
                             follow=not no_follow and until is None)
    import json

    for ev in stream:
        if fmt == "json":
            click.echo(json.dumps(ev, sort_keys=True))
        else:
            attrs = ", ".join(f"{k}={v}" for k, v in sorted(
                {"name": ev["name"], **ev["attributes"]}.items()) if v)
            click.echo(f"{ev['time']} {ev['type']} {ev['action']} {ev['id']} ({attrs})")
        sys.stdout.flush()


@click.command()
@FORMAT
def info(fmt: str) -> None:
    """The daemon, the host and the isolations they can run."""
    data = client().info()
    if fmt == "json":
        emit_json(data)
        return
    for key in ("version", "apiVersion", "pid", "root", "run", "cgroupVersion", "accelerator",
                "images"):
        click.echo(f"{key}: {data.get(key)}")
    click.echo("containers: " + ", ".join(f"{k} {v}" for k, v in data["containers"].items()))
    click.echo("isolations:")
    for name, state in data["isolations"].items():
        click.echo(f"  {name}: {state}")


ls = click.Command("ls", callback=ps.callback, params=ps.params,
                   help="List containers, filtered as HcsEnumerateComputeSystems: "
                        "--filter state= isolation= label= name= (running unless -a).")
