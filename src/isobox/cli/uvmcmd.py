"""``isobox uvm build|info``: the utility-VM assets, a local admin tool like ``isobox job run``.

It works on this host's files (``$ISOBOX_ROOT/uvm``) rather than through the daemon, so
this module alone of the CLI may import :mod:`isobox.uvm` (tests/test_architecture.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from isobox.errors import IsoboxError


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@click.group()
def uvm() -> None:
    """Utility-VM assets: the guest kernel, initramfs and read-only image."""


@uvm.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the cached assets match (and "
              "remove every VM template; the default one is built again).")
@click.option("--quiet", "-q", is_flag=True, help="Print only the assets folder.")
@click.option("--no-template", "no_template", is_flag=True,
              help="Do not build the default VM template (512 MiB, 1 vCPU) now; the first "
                   "VM container then builds it.")
def build(force: bool, quiet: bool, no_template: bool) -> None:
    """Build the assets, or reuse them when no input changed (packages, isobox's guest
    code, the builder); then the default utility-VM template that VM containers clone."""
    from isobox.uvm.assets import ensure_assets

    t0 = time.monotonic()

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"  {msg}", err=True)

    try:
        a = ensure_assets(force=force, progress=progress)
    except IsoboxError as exc:
        click.echo(f"isobox: error: {exc}", err=True)
        sys.exit(1)
    took = time.monotonic() - t0
    if quiet:
        click.echo(a.dir)
        return
    m = a.manifest
    verb = "built" if a.built else "reused (cache hit)"
    click.echo(f"utility-VM assets {a.key} {verb} in {took:.2f} s: {a.dir}")
    reused = set(m.get("reused", [])) if a.built else set(m["files"])
    for path in (a.kernel, a.initrd, a.image):
        how = "reused" if path.name in reused else "built"
        click.echo(f"  {path.name:<12} {_mb(path.stat().st_size):>9}  {how}")
    if a.built:
        for step, secs in m.get("steps_seconds", {}).items():
            click.echo(f"  {step:<40} {secs:6.2f} s")
    click.echo(f"  kernel {m.get('kernel_release')} ({m['inputs']['kernel_package']}), "
               f"{len(m.get('module_order', []))} modules")
    if not no_template:
        _build_template(a, force)


def _build_template(assets: object, force: bool) -> None:
    from isobox.uvm.template import ensure_template, remove_templates, template_root

    if force:  # every template goes (their guest RAM is tmpfs); the default one is rebuilt
        n = remove_templates()
        if n:
            click.echo(f"  removed {n} VM template(s) from {template_root()}")
    t0 = time.monotonic()
    try:
        tpl = ensure_template(assets, 512, 1, force=force)  # type: ignore[arg-type]
    except IsoboxError as exc:
        click.echo(f"isobox: error: the VM template: {exc}", err=True)
        sys.exit(1)
    took = time.monotonic() - t0
    how = f"built in {tpl.build_seconds:.2f} s" if took > 1 else "reused (cache hit)"
    ram = tpl.ram.stat().st_blocks * 512
    click.echo(f"VM template {tpl.key} ({tpl.memory_mib} MiB, {tpl.cpus} vCPU, "
               f"{tpl.accel}) {how}: {tpl.dir}")
    click.echo(f"  guest RAM in use {_mb(ram)} (shared by every clone), device state "
               f"{tpl.state.stat().st_size / 1e3:.0f} KB, saved in {tpl.save_seconds * 1e3:.0f} ms")


@uvm.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON only.")
def info(as_json: bool) -> None:
    """The current assets' manifest, and the accelerator the VMs use (KVM or TCG)."""
    from isobox.uvm.assets import load_assets

    a = load_assets()
    if a is None:
        click.echo("isobox: error: no utility-VM assets; run `isobox uvm build`", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(a.manifest, indent=2))
        return
    m = a.manifest
    click.echo(f"assets:   {a.dir} (key {a.key}, built {m.get('built_at')})")
    for path in (a.kernel, a.initrd, a.image):
        click.echo(f"  {path.name:<12} {_mb(path.stat().st_size):>9}")
    click.echo(f"kernel:   {m.get('kernel_release')} from {m['inputs']['kernel_package']}")
    click.echo(f"modules:  {' '.join(Path(p).stem for p in m.get('module_order', []))}")
    pkgs = m["inputs"]["packages"]
    click.echo("packages: " + ", ".join(f"{n} {v}" for n, v in sorted(pkgs.items())))
    click.echo(f"guest:    {len(m['inputs']['guest_sources'])} isobox files, "
               f"sha256 {m['inputs']['guest_sources_sha256'][:16]}")
    click.echo(f"cmdline:  {a.cmdline_base}")
    try:
        from isobox.uvm import accel
    except ImportError:
        return
    try:
        res = accel.probe(assets=a)
    except IsoboxError as exc:
        click.echo(f"accel:    probe failed: {exc}")
        return
    cached = " (cached)" if res.cached else ""
    click.echo(f"accel:    {res.name}{cached}: {res.reason}")
