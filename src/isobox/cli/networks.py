"""``isobox network create|ls|inspect|rm``: the daemon's NAT networks (docker's verbs).

A container joins one with ``run --network NAME``; containers on one network reach each
other by name, two networks cannot reach each other. The default network (``isobox``)
appears once a container used it.
"""

from __future__ import annotations

import sys

import click

from isobox.cli.common import client
from isobox.cli.format import FORMAT, ago, emit_json, table
from isobox.client import DaemonUnavailable
from isobox.errors import IsoboxError


@click.group()
def network() -> None:
    """Manage networks: create, ls, inspect, rm."""


@network.command("create")
@click.argument("name")
@click.option("--subnet", metavar="CIDR", help="IPv4 subnet (default: a free /24).")
@click.option("--internal", is_flag=True, help="No route out of the host (no NAT).")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE")
def create(name: str, subnet: str | None, internal: bool, labels: tuple[str, ...]) -> None:
    """Create a network; print its ID."""
    lab = {k: v for k, _, v in (item.partition("=") for item in labels)}
    net = client().networks.create(name, subnet=subnet, internal=internal, labels=lab)
    click.echo(net.id)


@network.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only network IDs.")
@FORMAT
def ls(quiet: bool, fmt: str) -> None:
    """List networks."""
    nets = client().networks.list()
    if fmt == "json":
        emit_json([n.attrs for n in nets])
        return
    if quiet:
        for n in nets:
            click.echo(n.short_id)
        return
    table(["NETWORK ID", "NAME", "SUBNET", "GATEWAY", "INTERNAL", "CONTAINERS", "CREATED"],
          [[n.short_id, n.name, n.attrs["subnet"], n.attrs["gateway"],
            "yes" if n.attrs["internal"] else "no", str(len(n.attrs["endpoints"])),
            ago(n.attrs["createdAt"])] for n in nets])


@network.command("inspect")
@click.argument("refs", nargs=-1, required=True)
def inspect(refs: tuple[str, ...]) -> None:
    """Networks as JSON (id, id prefix or name)."""
    c = client()
    emit_json([c.networks.get(ref).attrs for ref in refs])


@network.command("rm")
@click.argument("refs", nargs=-1, required=True)
def rm(refs: tuple[str, ...]) -> None:
    """Remove networks (refused while a container is on one)."""
    c = client()
    code = 0
    for ref in refs:
        try:
            c.networks.remove(ref)
        except DaemonUnavailable:
            raise
        except IsoboxError as exc:
            click.echo(f"isobox: {exc}", err=True)
            code = code or exc.exit_code
            continue
        click.echo(ref)
    if code:
        sys.exit(code)
