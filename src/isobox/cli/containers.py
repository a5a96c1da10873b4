"""The container verbs of ``isobox``: docker's, through :mod:`isobox.client` only.

``run`` without ``-d`` creates the container, then starts it *attached* (one upgraded
request, so no byte of output is missed) and pumps the stream against this terminal; its exit
code is the container's. As docker's: 125 when isobox itself fails (bad option, no image,
no daemon), 126/127 when the command cannot be run (the engine reports 127 for an exec
failure, with the reason on stderr).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from isobox.cli.format import FORMAT, ago, duration, emit_json, human_binary, parse_time, table
from isobox.client import Client, Container, DaemonUnavailable
from isobox.errors import InvalidArgument, IsoboxError, NotFound

if TYPE_CHECKING:  # wire's TypedDicts are types here; tarfile, tempfile, pathlib load for cp
    from isobox.spec.wire import ComputeSystemInfo

ISOLATIONS = ("process", "vm", "host")
_F = TypeVar("_F", bound=Callable[..., Any])


def client() -> Client:
    """The daemon's client; the daemon is started when it is not running (unless
    ``ISOBOX_AUTOSTART=0``)."""
    return Client(autostart=os.environ.get("ISOBOX_AUTOSTART", "1") != "0")


def fail(exc: IsoboxError, code: int) -> NoReturn:
    click.echo(f"isobox: {exc}", err=True)
    sys.exit(code)


def _env_items(items: Sequence[str]) -> list[str]:
    """``-e KEY=VALUE``, or ``-e KEY`` for this environment's value (skipped when unset)."""
    out = []
    for item in items:
        if "=" in item:
            out.append(item)
        elif item in os.environ:
            out.append(f"{item}={os.environ[item]}")
    return out


def create_options(f: _F) -> _F:
    """The options ``run`` and ``create`` share (docker's names)."""
    opts = [
        click.option("--name", help="Name the container."),
        click.option("-e", "--env", "env", multiple=True, metavar="KEY[=VALUE]",
                     help="Set an environment variable (KEY alone: take this one's)."),
        click.option("-w", "--workdir", help="Working directory in the container."),
        click.option("-u", "--user", help="NAME|UID[:GROUP|GID]."),
        click.option("--hostname", help="The container's host name."),
        click.option("-v", "--volume", "volumes", multiple=True, metavar="SRC:DST[:ro]",
                     help="Bind a host folder into the container."),
        click.option("--read-only", is_flag=True, help="Mount the root filesystem read-only."),
        click.option("-m", "--memory", help="Memory limit (20m, 1g)."),
        click.option("--cpus", type=float, help="CPU limit in CPUs (1.5)."),
        click.option("--cpu-shares", type=int, help="CPU weight (relative, 1024 default)."),
        click.option("--pids-limit", type=int, help="Process/thread limit."),
        click.option("--isolation", type=click.Choice(ISOLATIONS),
                     help="process (default), vm or host."),
        click.option("--network", type=click.Choice(["none", "host"]),
                     help="none (loopback only, default) or host."),
        click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE"),
        click.option("--entrypoint", help="Replace the image's entrypoint ('' clears it)."),
        click.option("-i", "--interactive", is_flag=True, help="Keep stdin open."),
        click.option("-t", "--tty", is_flag=True, help="Give the container a terminal."),
        click.option("--rm", is_flag=True, help="Remove the container when it stops."),
        click.argument("image"),
        click.argument("command", nargs=-1, type=click.UNPROCESSED),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _document_options(o: dict[str, Any]) -> dict[str, Any]:
    entrypoint = o["entrypoint"]
    return {
        "name": o["name"],
        "environment": _env_items(o["env"]),
        "working_dir": o["workdir"],
        "user": o["user"],
        "hostname": o["hostname"],
        "mounts": list(o["volumes"]),
        "read_only": o["read_only"],
        "mem_limit": o["memory"],
        "cpus": o["cpus"],
        "cpu_shares": o["cpu_shares"],
        "pids_limit": o["pids_limit"],
        "isolation": o["isolation"],
        "network_mode": o["network"],
        "labels": list(o["labels"]),
        "entrypoint": None if entrypoint is None else ([entrypoint] if entrypoint else []),
        "stdin_open": o["interactive"],
        "tty": o["tty"],
        "auto_remove": o["rm"],
    }


_RUN_CONTEXT = {"allow_interspersed_args": False}


@click.command(context_settings=_RUN_CONTEXT)
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print its ID.")
@create_options
def run(image: str, command: tuple[str, ...], detach: bool, **o: Any) -> None:
    """Run COMMAND in a new container from IMAGE; exit with its exit code."""
    c = _client_or_125()
    try:
        ct = c.containers.create(image, list(command) or None, **_document_options(o))
    except IsoboxError as exc:
        fail(exc, 125)
    if detach:
        try:
            ct.start()
        except IsoboxError as exc:
            if o["rm"]:
                with contextlib.suppress(IsoboxError):
                    ct.remove(force=True)
            fail(exc, 125)
        click.echo(ct.id)
        return
    sys.exit(_start_attached(ct, interactive=o["interactive"], tty=o["tty"], rm=o["rm"]))


def _client_or_125() -> Client:
    try:
        return client()
    except IsoboxError as exc:
        fail(exc, 125)


def _start_attached(ct: Container, *, interactive: bool, tty: bool, rm: bool,
                    isolation: str | None = None) -> int:
    from isobox.client.stream import pump

    try:
        raw = ct.start_attached(isolation=isolation, stdin=interactive)
    except IsoboxError as exc:
        if rm:
            with contextlib.suppress(IsoboxError):
                ct.remove(force=True)
        fail(exc, 125)

    def forward(sig: int) -> None:
        with contextlib.suppress(IsoboxError):
            ct.kill(sig)

    try:
        code = pump(raw, stdin=sys.stdin.fileno() if interactive else None, tty=tty,
                    on_signal=forward)
    except IsoboxError as exc:
        fail(exc, 125)
    if rm:
        # The daemon removes it; return once it is gone, so nothing is left when we exit.
        with contextlib.suppress(NotFound, DaemonUnavailable):
            ct.wait(condition="removed")
    return code


@click.command(context_settings=_RUN_CONTEXT)
@create_options
def create(image: str, command: tuple[str, ...], **o: Any) -> None:
    """Create a container from IMAGE (not started); print its ID."""
    c = _client_or_125()
    try:
        ct = c.containers.create(image, list(command) or None, **_document_options(o))
    except IsoboxError as exc:
        fail(exc, 125)
    click.echo(ct.id)


@click.command()
@click.option("-a", "--attach", is_flag=True, help="Attach its output; exit with its code.")
@click.option("-i", "--interactive", is_flag=True, help="Attach stdin too.")
@click.option("--isolation", type=click.Choice(ISOLATIONS),
              help="Start a stopped container under another isolation.")
@click.argument("refs", nargs=-1, required=True)
def start(refs: tuple[str, ...], attach: bool, interactive: bool, isolation: str | None) -> None:
    """Start created or stopped containers."""
    c = client()
    if attach or interactive:
        if len(refs) != 1:
            raise click.UsageError("attach to exactly one container")
        ct = c.containers.get(refs[0])
        tty = bool(ct.attrs["document"].get("process", {}).get("tty"))
        sys.exit(_start_attached(ct, interactive=interactive, tty=tty, rm=False,
                                 isolation=isolation))
    _each(refs, lambda ref: c.containers.get(ref).start(isolation=isolation))


def _each(refs: Sequence[str], action: Callable[[str], None]) -> None:
    """Do ``action`` to every ref, printing it; the first error's exit code at the end."""
    code = 0
    for ref in refs:
        try:
            action(ref)
        except DaemonUnavailable:
            raise
        except IsoboxError as exc:
            click.echo(f"isobox: {exc}", err=True)
            code = code or exc.exit_code
            continue
        click.echo(ref)
    if code:
        sys.exit(code)


@click.command()
@click.option("-t", "--time", "timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.argument("refs", nargs=-1, required=True)
def stop(refs: tuple[str, ...], timeout: float) -> None:
    """Stop running containers (SIGTERM, then SIGKILL)."""
    c = client()
    _each(refs, lambda ref: c.containers.get(ref).stop(timeout))


@click.command()
@click.option("-s", "--signal", "sig", default="SIGKILL", show_default=True)
@click.argument("refs", nargs=-1, required=True)
def kill(refs: tuple[str, ...], sig: str) -> None:
    """Send a signal to containers."""
    c = client()
    signal: str | int = int(sig) if sig.isdigit() else sig
    _each(refs, lambda ref: c.containers.get(ref).kill(signal))


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill and remove running containers.")
@click.option("-v", "--volumes", is_flag=True, hidden=True, help="Accepted, as docker's.")
@click.argument("refs", nargs=-1, required=True)
def rm(refs: tuple[str, ...], force: bool, volumes: bool) -> None:
    """Remove containers and everything they hold (scratch layer, logs)."""
    c = client()
    _each(refs, lambda ref: c.containers.get(ref).remove(force=force))


@click.command()
@click.argument("refs", nargs=-1, required=True)
def pause(refs: tuple[str, ...]) -> None:
    """Freeze every process of containers."""
    c = client()
    _each(refs, lambda ref: c.containers.get(ref).pause())


@click.command()
@click.argument("refs", nargs=-1, required=True)
def unpause(refs: tuple[str, ...]) -> None:
    """Thaw paused containers."""
    c = client()
    _each(refs, lambda ref: c.containers.get(ref).unpause())


@click.command()
@click.argument("refs", nargs=-1, required=True)
def wait(refs: tuple[str, ...]) -> None:
    """Wait until containers stop; print their exit codes."""
    c = client()
    for ref in refs:
        click.echo(c.containers.get(ref).wait()["exitCode"])


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
@click.option("--since", help="RFC 3339 time or unix seconds.")
@click.option("--until", help="RFC 3339 time or unix seconds.")
@click.option("-n", "--tail", help="Lines from the end (or 'all').")
@click.option("-t", "--timestamps", is_flag=True)
@click.argument("ref")
def logs(ref: str, *, follow: bool, since: str | None, until: str | None, tail: str | None,
         timestamps: bool) -> None:
    """Print a container's output (stdout to stdout, stderr to stderr)."""
    ct = client().containers.get(ref)
    n = None if tail in (None, "all") else int(tail)
    entries = ct.logs(stream=True, follow=follow, since=since, until=until, tail=n)
    assert not isinstance(entries, bytes)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for e in entries:
        line = (e["time"] + " " if timestamps else "") + e["line"]
        target = err if e["stream"] == "stderr" else out
        target.write(line.encode())
        if follow:
            target.flush()


@click.command("exec", context_settings=_RUN_CONTEXT)
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin.")
@click.option("-t", "--tty", is_flag=True, help="Give the process a terminal.")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY[=VALUE]")
@click.option("-w", "--workdir")
@click.option("-u", "--user")
@click.argument("ref")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(ref: str, command: tuple[str, ...], *, interactive: bool, tty: bool,
          env: tuple[str, ...], workdir: str | None, user: str | None) -> None:
    """Run COMMAND in a running container; exit with its exit code."""
    from isobox.client.stream import pump

    ct = client().containers.get(ref)
    try:
        raw = ct.exec_stream(list(command), stdin=interactive, tty=tty,
                             environment=_env_items(env), workdir=workdir, user=user)
    except IsoboxError as exc:
        fail(exc, 126 if exc.exit_code != 2 else 125)

    # Ctrl-C ends the stream (KeyboardInterrupt, exit 130); as docker, no signal is proxied
    # to an exec'd process.
    sys.exit(pump(raw, stdin=sys.stdin.fileno() if interactive else None, tty=tty))


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
@click.option("--since", help="RFC 3339 time or unix seconds.")
@click.option("--until", help="RFC 3339 time or unix seconds (ends the stream).")
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
    stream = client().events(since=since, until=until, filters=pairs,
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


# ---- cp ------------------------------------------------------------------------------------


def _split(arg: str) -> tuple[str | None, str]:
    """``CONTAINER:PATH`` -> (container, path); a local path (``./a:b``, ``/x``) -> (None, p)."""
    head, sep, tail = arg.partition(":")
    if not sep or not head or head.startswith((".", "/")):
        return None, arg
    return head, tail


def _remote_kind(ct: Container, path: str) -> str | None:
    """``dir``, ``file`` or None (absent): from the first header of the path's archive."""
    import tarfile

    try:
        chunks = ct.get_archive(path)
    except NotFound:
        return None
    head = b""
    try:
        for chunk in chunks:
            head += chunk
            if len(head) >= tarfile.BLOCKSIZE:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    try:
        member = tarfile.TarInfo.frombuf(head[: tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.TarError:
        return "file"
    return "dir" if member.isdir() else "file"


def _copy_out(ct: Container, src: str, dst: str) -> None:
    import tarfile
    import tempfile
    from pathlib import Path

    chunks = ct.get_archive(src)
    if dst == "-":
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        return
    with tempfile.TemporaryFile() as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        target = Path(dst)
        name = os.path.basename(src.rstrip("/")) or "."
        with tarfile.open(fileobj=spool, mode="r:") as tar:
            if target.is_dir():
                tar.extractall(target, filter="data")
                return
            # Copy under the new name: extract beside it, then rename the top entry.
            parent = target.absolute().parent
            if not parent.is_dir():
                raise InvalidArgument(f"{parent}: no such directory")
            with tempfile.TemporaryDirectory(dir=parent, prefix=".isobox-cp-") as tmp:
                tar.extractall(tmp, filter="data")
                os.replace(Path(tmp, name), target)


def _copy_in(ct: Container, src: str, dst: str) -> None:
    import tarfile
    import tempfile
    from pathlib import Path

    source = Path(src)
    if not source.exists():
        raise InvalidArgument(f"{src}: no such file or directory")
    if dst.endswith("/") or _remote_kind(ct, dst) == "dir":
        folder, name = dst, source.name
    else:
        folder, name = os.path.dirname(dst.rstrip("/")) or "/", os.path.basename(dst)
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(source, arcname=name)
        spool.seek(0)
        ct.put_archive(folder, spool)


@click.command()
@click.argument("src")
@click.argument("dst")
def cp(src: str, dst: str) -> None:
    """Copy files between a container and the host: CONTAINER:PATH on one side."""
    (sc, sp), (dc, dp) = _split(src), _split(dst)
    if (sc is None) == (dc is None):
        raise InvalidArgument("cp: give CONTAINER:PATH as exactly one of SRC and DST")
    c = client()
    if sc is not None:
        _copy_out(c.containers.get(sc), sp, dp)
    else:
        assert dc is not None
        _copy_in(c.containers.get(dc), sp, dp)


ls = click.Command("ls", callback=ps.callback, params=ps.params,
                   help="List containers, filtered as HcsEnumerateComputeSystems: "
                        "--filter state= isolation= label= name= (running unless -a).")
