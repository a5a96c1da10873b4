"""The container lifecycle verbs of ``isobox``: docker's, through :mod:`isobox.client` only.

``run`` without ``-d`` creates the container, then starts it *attached* (one upgraded
request, so no byte of output is missed) and pumps the stream against this terminal; its exit
code is the container's. As docker's: 125 when isobox itself fails (bad option, no image,
no daemon), 126/127 when the command cannot be run (the engine reports 127 for an exec
failure, with the reason on stderr). The verbs that look at containers are in
:mod:`isobox.cli.listing`, ``cp`` in :mod:`isobox.cli.copying`: ``run`` loads neither.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from isobox.cli.common import client, fail
from isobox.client import Client, Container, DaemonUnavailable
from isobox.errors import IsoboxError, NotFound

ISOLATIONS = ("process", "vm", "host")
_F = TypeVar("_F", bound=Callable[..., Any])


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
        click.option("--cap-add", "cap_add", multiple=True, metavar="CAP",
                     help="Add a capability to Docker's default 14 (ALL: every one)."),
        click.option("-m", "--memory", help="Memory limit (20m, 1g)."),
        click.option("--cpus", type=float, help="CPU limit in CPUs (1.5)."),
        click.option("--cpu-shares", type=int, help="CPU weight (relative, 1024 default)."),
        click.option("--pids-limit", type=int, help="Process/thread limit."),
        click.option("--isolation", type=click.Choice(ISOLATIONS),
                     help="process (default), vm or host."),
        click.option("--no-template", "no_template", is_flag=True,
                     help="With --isolation=vm: boot the utility VM cold instead of cloning "
                          "it from a template (slower; for comparison)."),
        click.option("--network", metavar="MODE",
                     help="default (the NAT network isobox), none (loopback only), host, "
                          "a network's NAME, or container:ID (share its network)."),
        click.option("-p", "--publish", "ports", multiple=True,
                     metavar="[IP:]HOSTPORT:CTRPORT[/tcp|udp]",
                     help="Publish a container port on the host (repeatable)."),
        click.option("--network-rate", metavar="BYTES/s",
                     help="Egress rate limit of the container (1m, 512k)."),
        click.option("--network-alias", "network_aliases", multiple=True, metavar="NAME",
                     help="Another name of the container on its network (repeatable)."),
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
        "cap_add": list(o["cap_add"]),
        "mem_limit": o["memory"],
        "cpus": o["cpus"],
        "cpu_shares": o["cpu_shares"],
        "pids_limit": o["pids_limit"],
        "isolation": o["isolation"],
        "network_mode": o["network"],
        "ports": list(o["ports"]) or None,
        "network_rate": _rate(o["network_rate"]),
        "network_aliases": list(o["network_aliases"]) or None,
        "labels": list(o["labels"]),
        "entrypoint": None if entrypoint is None else ([entrypoint] if entrypoint else []),
        "stdin_open": o["interactive"],
        "tty": o["tty"],
        "auto_remove": o["rm"],
        "vm_template": not o["no_template"],
    }


def _rate(text: str | None) -> int | None:
    """``--network-rate``: bytes per second, ``1m``, ``512k`` (a trailing ``/s`` too)."""
    if text is None:
        return None
    from isobox.client.api import parse_size

    return parse_size(text.removesuffix("/s"))


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
        # The start failed after the stream opened (an error frame): --rm still removes.
        if rm:
            with contextlib.suppress(IsoboxError):
                ct.remove(force=True)
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
