"""The image verbs of ``isobox``, through the daemon (``isobox.client``).

Their options and outputs are those the verbs had when they used the store directly
(``scripts/demo.sh`` reads them), except ``images --format json``, which now prints the API's
``ImageInfo`` records (``layers`` is a count there; ``image inspect`` has the details).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from isobox.cli.common import client
from isobox.cli.format import FORMAT, emit_json, human, table


@click.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("name", required=False)
@click.option("-q", "--quiet", is_flag=True, help="Print only the image ID.")
def import_(path: Path, name: str | None, quiet: bool) -> None:
    """Import an OCI layout/archive, a docker save archive, a rootfs tar or a directory."""
    img = client().images.import_file(path, name)
    if quiet:
        click.echo(img.id)
    else:
        click.echo(f"Imported {', '.join(img.tags) or '<untagged>'} {img.id}")


@click.command()
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci",
              show_default=True)
def save(ref: str, output: Path, fmt: str) -> None:
    """Write an image as an OCI archive or a docker save archive."""
    client().images.save(ref, output, fmt)


def _list_images(quiet: bool, fmt: str) -> None:
    imgs = client().images.list()
    if fmt == "json":
        emit_json([i.attrs for i in imgs])
        return
    if quiet:
        for i in imgs:
            click.echo(i.short_id)
        return
    rows: list[list[str]] = []
    for i in imgs:
        for tag in i.tags or ["<none>:<none>"]:
            repo, _, t = tag.rpartition(":")
            rows.append([repo, t, i.short_id, str(i.attrs.get("created") or ""),
                         human(int(i.attrs.get("size", 0)))])
    table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], rows)


@click.command()
@click.option("-q", "--quiet", is_flag=True, help="Only image IDs.")
@FORMAT
def images(quiet: bool, fmt: str) -> None:
    """List images."""
    _list_images(quiet, fmt)


def _remove(refs: Sequence[str], force: bool) -> None:
    c = client()
    for ref in refs:
        result = c.images.remove(ref, force=force)
        for u in result["untagged"]:
            click.echo(f"Untagged: {u}")
        for d in result["deleted"]:
            click.echo(f"Deleted: {d}")


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove every tag of an image named by ID.")
def rmi(refs: tuple[str, ...], force: bool) -> None:
    """Remove images (layers another image or a container uses stay)."""
    _remove(refs, force)


@click.command()
@click.argument("source")
@click.argument("target")
def tag(source: str, target: str) -> None:
    """Give an image another name."""
    client().images.tag(source, target)


@click.group()
def image() -> None:
    """Manage images."""


@image.command("ls")
@click.option("-q", "--quiet", is_flag=True)
@FORMAT
def image_ls(quiet: bool, fmt: str) -> None:
    """List images."""
    _list_images(quiet, fmt)


@image.command("inspect")
@click.argument("refs", nargs=-1, required=True)
def image_inspect(refs: tuple[str, ...]) -> None:
    """Show images as JSON, with their config and manifest."""
    c = client()
    emit_json([c.images.get(ref).attrs for ref in refs])


@image.command("rm")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True)
def image_rm(refs: tuple[str, ...], force: bool) -> None:
    """Remove images."""
    _remove(refs, force)


@image.command("prune")
@FORMAT
def image_prune(fmt: str) -> None:
    """Remove untagged images and every blob, layer and staging folder nothing uses."""
    r = client().images.prune()
    if fmt == "json":
        emit_json(r)
        return
    for d in r["images_removed"]:
        click.echo(f"Deleted: {d}")
    click.echo(
        f"Removed {r['blobs_removed']} blobs, {r['layers_removed']} layers, "
        f"{r['staging_removed']} unfinished imports; reclaimed {human(r['bytes_freed'])}"
    )


@image.command("bootstrap")
@click.argument("which", type=click.Choice(["busybox", "debian"]))
@click.option("--name", help="Name to give the image (default busybox:latest / debian:bookworm).")
def image_bootstrap(which: str, name: str | None) -> None:
    """Build a base image from Debian packages, with no registry."""
    img = client().images.bootstrap(which, name)
    click.echo(f"{', '.join(img.tags)} {img.id}")


image.add_command(import_, "import")
image.add_command(save, "save")
image.add_command(tag, "tag")
