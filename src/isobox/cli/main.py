"""The ``isobox`` command.

Each verb imports what it needs inside its function, so ``isobox --version`` and ``--help``
load click and nothing of the engine. Errors from the one error tree become one line on
stderr and the error's exit code; anything else is a bug and shows its traceback.

Until the daemon exists (see docs/architecture.md), the image verbs use the store directly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from isobox import __version__

if TYPE_CHECKING:
    from isobox.storage.store import ImageRecord, ImageStore

FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)


def _store() -> ImageStore:
    from isobox.storage.store import ImageStore

    return ImageStore()


def _emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [headers, *rows]:
        click.echo("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n:.1f}GB"


def _image_json(img: ImageRecord) -> dict[str, Any]:
    return {
        "id": img.id,
        "digest": img.digest,
        "tags": img.tags,
        "created": img.created,
        "size": img.size,
        "architecture": img.architecture,
        "os": img.os,
        "media_type": img.media_type,
        "layers": [
            {
                "digest": la.blob,
                "media_type": la.media_type,
                "size": la.size,
                "diff_id": la.diff_id,
                "chain_id": la.chain_id,
            }
            for la in img.layers
        ],
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isobox")
def cli() -> None:
    """isobox: one image, isolation chosen at run time (process, vm or host)."""


# ---- images -------------------------------------------------------------------------------


@cli.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("name", required=False)
@click.option("-q", "--quiet", is_flag=True, help="Print only the image ID.")
def import_(path: Path, name: str | None, quiet: bool) -> None:
    """Import an OCI layout/archive, a docker save archive, a rootfs tar or a directory."""
    from isobox.storage.importer import import_path

    img = import_path(_store(), path, name)
    if quiet:
        click.echo(img.id)
    else:
        click.echo(f"Imported {', '.join(img.tags) or '<untagged>'} {img.id}")


@cli.command()
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["oci", "docker"]), default="oci",
              show_default=True)
def save(ref: str, output: Path, fmt: str) -> None:
    """Write an image as an OCI archive or a docker save archive."""
    from isobox.storage.export import save as save_image

    save_image(_store(), ref, output, fmt)  # type: ignore[arg-type]


@cli.command()
@click.option("-q", "--quiet", is_flag=True, help="Only image IDs.")
@FORMAT
def images(quiet: bool, fmt: str) -> None:
    """List images."""
    _list_images(quiet, fmt)


def _list_images(quiet: bool, fmt: str) -> None:
    imgs = _store().images()
    if fmt == "json":
        _emit_json([_image_json(i) for i in imgs])
        return
    if quiet:
        for i in imgs:
            click.echo(i.short_id)
        return
    rows: list[list[str]] = []
    for i in imgs:
        for tag in i.tags or ["<none>:<none>"]:
            repo, _, t = tag.rpartition(":")
            rows.append([repo, t, i.short_id, i.created or "", _human(i.size)])
    _table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], rows)


@cli.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove every tag of an image named by ID.")
def rmi(refs: tuple[str, ...], force: bool) -> None:
    """Remove images (layers another image or a container uses stay)."""
    _remove(refs, force)


def _remove(refs: Sequence[str], force: bool) -> None:
    store = _store()
    for ref in refs:
        untagged, deleted = store.remove(ref, force=force)
        for u in untagged:
            click.echo(f"Untagged: {u}")
        for d in deleted:
            click.echo(f"Deleted: {d}")


@cli.command()
@click.argument("source")
@click.argument("target")
def tag(source: str, target: str) -> None:
    """Give an image another name."""
    _store().tag(source, target)


@cli.group()
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
    store = _store()
    out = []
    for ref in refs:
        img = store.get(ref)
        data = _image_json(img)
        data["config"] = json.loads(store.blobs.read_bytes(img.config_digest))
        data["manifest"] = json.loads(store.manifest_bytes(img))
        data["layer_dirs"] = [str(store.layer_diff(la.chain_id)) for la in img.layers]
        out.append(data)
    _emit_json(out)


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
    r = _store().prune()
    if fmt == "json":
        _emit_json(
            {
                "images_removed": r.images_removed,
                "blobs_removed": r.blobs_removed,
                "layers_removed": r.layers_removed,
                "staging_removed": r.staging_removed,
                "bytes_freed": r.bytes_freed,
            }
        )
        return
    for d in r.images_removed:
        click.echo(f"Deleted: {d}")
    click.echo(
        f"Removed {r.blobs_removed} blobs, {r.layers_removed} layers, {r.staging_removed} "
        f"unfinished imports; reclaimed {_human(r.bytes_freed)}"
    )


@image.command("bootstrap")
@click.argument("which", type=click.Choice(["busybox", "debian"]))
@click.option("--name", help="Name to give the image (default busybox:latest / debian:bookworm).")
def image_bootstrap(which: str, name: str | None) -> None:
    """Build a base image from Debian packages, with no registry."""
    from isobox.storage import bootstrap

    store = _store()
    if which == "busybox":
        img = bootstrap.bootstrap_busybox(store, name or "busybox:latest")
    else:
        img = bootstrap.bootstrap_debian(store, name or "debian:bookworm")
    click.echo(f"{', '.join(img.tags)} {img.id}")


# ---- jobs ---------------------------------------------------------------------------------


@cli.group()
def job() -> None:
    """Run host commands in a Job: limits, accounting, notifications (cgroup v1/v2)."""


@job.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--cpu-rate", type=int, help="Hard CPU cap in 1/100 % of the machine (1..10000).")
@click.option("--cpus", type=float, help="Hard CPU cap in CPUs (1.5 = one and a half CPUs).")
@click.option("--cpu-weight", type=int, help="CPU weight 1..10000 (100 is the default share).")
@click.option("--memory", help="Job memory limit (20m, 1g).")
@click.option("--process-memory", help="Per-process memory limit (RLIMIT_AS).")
@click.option("--pids", type=int, help="Task limit: processes and threads.")
@click.option("--cpuset", help="CPUs the job may use (0-1).")
@click.option("--io-read-bps", multiple=True, metavar="DEV:RATE", help="Read rate per device.")
@click.option("--io-write-bps", multiple=True, metavar="DEV:RATE", help="Write rate per device.")
@click.option("--name", help="Job name (default: a random one).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="How to print the accounting (on stderr) at exit.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def job_run(command: tuple[str, ...], **opts: Any) -> None:
    """Run COMMAND in a fresh job; exit with its exit code; print the job's accounting.

    When COMMAND exits, whatever it left running in the job is killed (kill on close), and
    the accounting then counts every process that ran. Example (the seeds' JobExample):
    isobox job run --cpu-rate 150 --memory 20m -- CMD
    """
    from isobox.cli.jobrun import run_job

    sys.exit(run_job(list(command), **opts))


image.add_command(import_, "import")
image.add_command(save, "save")
image.add_command(tag, "tag")


def main(argv: Sequence[str] | None = None) -> None:
    from isobox.errors import IsoboxError

    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="isobox",
                 standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except IsoboxError as exc:
        click.echo(f"isobox: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
