"""The utility-VM assets (isobox.uvm.assets): a real build from Debian's packages, its
cache, rebuild on a changed input, a failed build that leaves the previous assets, what
the image holds, and a boot of kernel + initramfs + image under QEMU/TCG.

One build per module (~10 s; the .debs come from the shared test copy when it exists);
tests that change the cache work on a hard-linked clone of it.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isobox.errors import ToolMissing, UvmAssetsError
from isobox.uvm import assets as uvm_assets
from isobox.uvm.assets import IMAGE_SERIAL, Assets, ensure_assets, load_assets

pytestmark = [pytest.mark.root, pytest.mark.slow]

SRC = Path(__file__).resolve().parent.parent / "src" / "isobox"


def _clone(src: Path, dest: Path) -> None:
    """A cheap copy of a root's uvm folder (hard links; builds never write in place)."""
    shutil.copytree(src / "uvm", dest / "uvm", symlinks=True, copy_function=os.link)


@pytest.fixture(scope="module")
def guest_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of src/isobox: the tree is shared with engineers editing it right now,
    and a changed guest source is (rightly) a rebuild."""
    src = tmp_path_factory.mktemp("guest-src") / "isobox"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    return src


@pytest.fixture(scope="module")
def built_root(tmp_path_factory: pytest.TempPathFactory, guest_src: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("uvm-build")
    shared = Path(os.environ.get("ISOBOX_UVM_DIR", "/nonexistent")) / "debs"
    if shared.is_dir():
        (root / "uvm" / "debs").mkdir(parents=True)
        for deb in shared.glob("*.deb"):
            try:
                os.link(deb, root / "uvm" / "debs" / deb.name)
            except OSError:
                shutil.copyfile(deb, root / "uvm" / "debs" / deb.name)
    ensure_assets(root, guest_src=guest_src)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # ~120 MB: not kept with pytest's last runs


@pytest.fixture
def clone(built_root: Path, tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "clone"
    _clone(built_root, root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _dump(image: Path, path: str) -> str:
    proc = subprocess.run(["dump.erofs", f"--path={path}", "--ls", str(image)],
                          capture_output=True, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else ""


def _in_image(image: Path, path: str) -> bool:
    proc = subprocess.run(["dump.erofs", f"--path={path}", str(image)],
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0 and proc.stdout.startswith("File :")


def _no_temp(base: Path) -> list[str]:
    return [p.name for p in base.rglob(".*") if p.name.startswith((".build-", ".dl-"))
            or p.name.endswith(".tmp")]


def test_second_call_is_a_cache_hit(built_root: Path, guest_src: Path) -> None:
    first = load_assets(built_root)
    assert first is not None
    t = time.monotonic()
    again = ensure_assets(built_root, guest_src=guest_src)
    took = time.monotonic() - t
    assert not again.built
    assert took < 1.0, f"cache hit took {took:.2f} s"
    assert again.key == first.key and again.kernel.samefile(first.kernel)
    m = again.manifest
    assert set(m["files"]) == {"vmlinux", "initrd.cpio", "uvm.erofs"}
    assert m["inputs"]["kernel_package"].startswith("linux-image-")
    assert m["image_serial"] == IMAGE_SERIAL == "uvm"
    # the kernel is the uncompressed ELF (PVH boot), the initramfs uncompressed newc
    assert again.kernel.read_bytes()[:4] == b"\x7fELF"
    assert again.initrd.read_bytes()[:6] == b"070701"
    assert "console=ttyS0" in again.cmdline_base and "panic=-1" in again.cmdline_base


def test_changed_guest_source_rebuilds_the_image_only(clone: Path, tmp_path: Path,
                                                     guest_src: Path) -> None:
    before = load_assets(clone)
    assert before is not None
    src = tmp_path / "src" / "isobox"
    shutil.copytree(guest_src, src)
    (src / "silo" / "zz_marker.py").write_text("MARK = 1\n")
    (src / "silo" / "zz_needs_pydantic.py").write_text("import pydantic\n")
    after = ensure_assets(clone, guest_src=src)
    assert after.built and after.key != before.key
    assert sorted(after.manifest["reused"]) == ["initrd.cpio", "vmlinux"]
    assert after.kernel.samefile(before.kernel)  # linked, not rebuilt
    assert _in_image(after.image, "/opt/isobox/isobox/silo/zz_marker.py")
    assert not _in_image(after.image, "/opt/isobox/isobox/silo/zz_needs_pydantic.py")
    assert not _in_image(before.image, "/opt/isobox/isobox/silo/zz_marker.py")
    cur = load_assets(clone)
    assert cur is not None and cur.key == after.key
    assert before.dir.is_dir(), "the previous assets are kept (a VM may be starting on them)"
    assert not ensure_assets(clone, guest_src=src).built
    assert not _no_temp(clone / "uvm")


def _path_without(tmp_path: Path, tool: str, replacement: str | None = None) -> str:
    """A PATH of links to every host tool but ``tool`` (or with a failing stand-in)."""
    d = tmp_path / "bin"
    d.mkdir()
    for sysdir in ("/usr/local/bin", "/usr/bin", "/usr/sbin"):
        for entry in Path(sysdir).iterdir():
            if entry.name != tool and not (d / entry.name).exists():
                (d / entry.name).symlink_to(entry)
    if replacement is not None:
        (d / tool).write_text(replacement)
        (d / tool).chmod(0o755)
    return str(d)


def test_missing_tool_is_a_clear_error_and_keeps_the_assets(
        clone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guest_src: Path) -> None:
    before = load_assets(clone)
    assert before is not None
    monkeypatch.setenv("PATH", _path_without(tmp_path, "mkfs.erofs"))
    with pytest.raises(ToolMissing, match=r"mkfs\.erofs.*erofs-utils"):
        ensure_assets(clone, force=True, guest_src=guest_src)
    _assert_unchanged(clone, before)


def test_failing_step_mid_build_leaves_the_previous_assets_and_no_temp_files(
        clone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guest_src: Path) -> None:
    before = load_assets(clone)
    assert before is not None
    # mkfs.erofs runs last, after the kernel, initramfs and the whole tree are built: it
    # writes half an image and fails.
    fake = ('#!/bin/sh\nfor a; do out=$cur; cur=$a; done\necho partial > "$out"\n'
            'echo "mkfs.erofs: disk on fire" >&2; exit 3\n')
    monkeypatch.setenv("PATH", _path_without(tmp_path, "mkfs.erofs", fake))
    src = tmp_path / "src" / "isobox"
    shutil.copytree(guest_src, src)
    (src / "silo" / "zz_marker.py").write_text("MARK = 2\n")  # a new image is needed
    with pytest.raises(UvmAssetsError, match="disk on fire"):
        ensure_assets(clone, guest_src=src)
    _assert_unchanged(clone, before)


def _assert_unchanged(root: Path, before: Assets) -> None:
    now = load_assets(root)
    assert now is not None and now.key == before.key and now.dir == before.dir
    assert now.image.samefile(before.image) and now.image.stat().st_size > 10_000_000
    assert not _no_temp(root / "uvm"), _no_temp(root / "uvm")
    dirs = {p.name for p in (root / "uvm").iterdir() if p.is_dir() and not p.is_symlink()}
    assert dirs == {before.key, "debs"}


def test_image_holds_python_and_the_guest_packages(built_root: Path) -> None:
    a = load_assets(built_root)
    assert a is not None
    img = a.image
    for path in ("/usr/bin/python3", "/usr/bin/python3.11", "/bin/busybox", "/bin/sh",
                 "/sbin/init", "/etc/ld.so.cache", "/etc/passwd",
                 "/usr/lib/x86_64-linux-gnu/libseccomp.so.2", "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                 "/usr/lib/python3.11/json/__init__.py",
                 "/usr/lib/python3.11/__pycache__/dataclasses.cpython-311.pyc",
                 "/opt/isobox/isobox/__init__.py", "/opt/isobox/isobox/errors.py",
                 "/opt/isobox/isobox/paths.py", "/opt/isobox/isobox/_sys/linux.py",
                 "/opt/isobox/isobox/_sys/seccomp_default.json",
                 "/opt/isobox/isobox/jobs/cgroup.py", "/opt/isobox/isobox/silo/container.py",
                 "/opt/isobox/isobox/silo/__pycache__/container.cpython-311.pyc",
                 "/proc", "/sys", "/dev", "/run", "/tmp", "/scratch", "/containers"):
        assert _in_image(img, path), path
    if (SRC / "agent" / "__init__.py").exists():
        assert _in_image(img, "/opt/isobox/isobox/agent/__init__.py")
    # nothing that needs pydantic or the engine's state
    for path in ("/opt/isobox/isobox/storage", "/opt/isobox/isobox/spec",
                 "/opt/isobox/isobox/silo/image_root.py", "/opt/isobox/isobox/compute",
                 "/opt/isobox/pydantic", "/usr/lib/python3.11/test"):
        assert not _in_image(img, path), path
    assert "container.py" in _dump(img, "/opt/isobox/isobox/silo")


def test_initramfs_holds_busybox_init_and_the_modules(built_root: Path, tmp_path: Path) -> None:
    a = load_assets(built_root)
    assert a is not None
    out = tmp_path / "x"
    out.mkdir()
    with open(a.initrd, "rb") as fh:
        subprocess.run(["busybox", "cpio", "-i", "-d"], stdin=fh, cwd=out, check=True,
                       capture_output=True)
    order = (out / "modules.order").read_text().split()
    assert order == a.manifest["module_order"] and len(order) == 23  # + virtio_net and deps
    names = [Path(m).name for m in order]
    for ko in ("virtio_mmio.ko", "virtio_blk.ko", "virtio_console.ko", "erofs.ko",
               "overlay.ko", "ext4.ko", "9p.ko", "9pnet_virtio.ko"):
        assert ko in names
    assert names.index("virtio.ko") < names.index("virtio_mmio.ko")
    assert names.index("crc32c_generic.ko") < names.index("libcrc32c.ko")
    assert all((out / m).is_file() for m in order)
    assert os.access(out / "init", os.X_OK) and (out / "bin" / "busybox").is_file()
    assert "switch_root" in (out / "init").read_text()
    dev = subprocess.run(["busybox", "cpio", "-t", "-v"], input=a.initrd.read_bytes(),
                         capture_output=True, check=True).stdout.decode()
    assert any(line.startswith("c") and line.endswith("dev/console") for line in
               dev.splitlines())


@pytest.mark.vm
def test_boots_under_tcg_and_imports_the_guest_code(tmp_path: Path) -> None:
    """Kernel + initramfs + image boot on QEMU microvm under TCG; stage 2 runs a command
    from the kernel command line, which imports isobox.silo.container under the guest's
    Debian python3, prints ok on the serial console, and powers the VM off."""
    a = ensure_assets()  # the shared test copy (built by the vm probe)
    cmd = "python3 -c \"import isobox.silo.container; print('ok')\"; uname -r"
    console = tmp_path / "console.log"
    argv = [
        "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel", "tcg,tb-size=32", "-cpu", "max", "-m", "512", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(a.kernel), "-initrd", str(a.initrd),
        "-append", f"{a.cmdline_base} isobox.cmd={base64.b64encode(cmd.encode()).decode()}",
        "-serial", f"file:{console}",
        "-drive", f"id=img,file={a.image},format=raw,if=none,readonly=on,cache=unsafe",
        "-device", f"virtio-blk-device,drive=img,serial={IMAGE_SERIAL}",
        "-device", "virtio-rng-device",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        qemu_out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
    took = time.monotonic() - t0
    text = console.read_text(errors="replace") if console.exists() else ""
    assert rc == 0, f"QEMU did not power off within 60 s (rc {rc}): {qemu_out}\n{text}"
    lines = text.splitlines()
    assert "ok" in lines, text
    assert "isobox.cmd exit=0" in lines, text
    assert a.manifest["kernel_release"] in lines, "uname -r is the guest kernel's"
    assert "isobox-initrd:" not in text, text
    print(f"boot + import + poweroff: {took:.2f} s")
    assert not Path(f"/proc/{proc.pid}").exists()


def test_uvm_cli_build_and_info(clone: Path) -> None:
    env = {**os.environ, "ISOBOX_ROOT": str(clone), "ISOBOX_UVM_DIR": ""}
    isobox = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "isobox")
    built = subprocess.run([isobox, "uvm", "build"], env=env, capture_output=True,
                           text=True, check=False, timeout=180)
    assert built.returncode == 0, built.stderr[-2000:]
    out = built.stdout
    # the CLI builds from the live src/isobox, which may differ from the snapshot
    assert ("reused (cache hit)" in out or " built in " in out), out
    assert "uvm.erofs" in out and "MB" in out
    assert "VM template " in out and "(512 MiB, 1 vCPU" in out, out  # the default one
    out = subprocess.run([isobox, "uvm", "info", "--json"], env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert '"key"' in out and uvm_assets.KERNEL_FILE in out
