"""The guest kernel: Debian's vmlinuz made an uncompressed vmlinux, and the modules it needs.

Why uncompressed: QEMU boots an ELF ``vmlinux`` through its PVH note and the guest skips
the XZ decompression, which costs ~3.6 s under TCG (docs/uvm-design.md, section 1).
"""

from __future__ import annotations

import lzma
import re
import struct
import subprocess
import zlib
from pathlib import Path

from isobox.errors import UvmAssetsError

# What the guest loads, by module name; dependencies come from each module's modinfo.
# virtio transport + console + disks + rng, ext4 (a module in the standard flavour) for
# scratch disks, overlay + erofs (+ squashfs) for container roots and the image, 9p for
# mapped directories, virtio_net (+ net_failover, failover) for a network's tap.
# crc32c_generic first: libcrc32c asks the crypto API for "crc32c".
WANTED_MODULES = (
    "virtio_mmio", "virtio_console", "virtio_blk", "virtio_rng", "crc32c_generic",
    "ext4", "overlay", "erofs", "squashfs", "9pnet_virtio", "9p", "virtio_net",
)


def find_kernel(tree: Path) -> tuple[str, Path, Path]:
    """``(release, vmlinuz, modules dir)`` of an extracted linux-image package."""
    found = sorted((tree / "boot").glob("vmlinuz-*"))
    if not found:
        raise UvmAssetsError(f"no boot/vmlinuz-* in the kernel package ({tree})")
    release = found[0].name.removeprefix("vmlinuz-")
    mods = tree / "lib" / "modules" / release
    if not mods.is_dir():
        raise UvmAssetsError(f"no lib/modules/{release} in the kernel package")
    return release, found[0], mods


def vmlinux_from_bzimage(data: bytes) -> bytes:
    """The ELF kernel inside a bzImage. The setup header locates the compressed payload;
    XZ goes through a stream decompressor because the kernel appends a 4-byte size after
    the stream (``lzma.decompress`` rejects that)."""
    if data[0x202:0x206] != b"HdrS":
        raise UvmAssetsError("vmlinuz has no Linux setup header (HdrS)")
    setup_sects = data[0x1F1] or 4
    start = (setup_sects + 1) * 512
    off, length = struct.unpack_from("<II", data, 0x248)
    payload = data[start + off: start + off + length]
    if payload[:6] == b"\xfd7zXZ\x00":
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload[:2] == b"\x1f\x8b":
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    elif payload[:4] == b"\x28\xb5\x2f\xfd":
        out = subprocess.run(["zstd", "-dcq"], input=payload, capture_output=True,
                             check=False).stdout
    else:
        raise UvmAssetsError(f"unknown kernel payload compression (magic {payload[:6].hex()})")
    if out[:4] != b"\x7fELF":
        raise UvmAssetsError("the decompressed kernel payload is not an ELF file")
    return out


def _depends(ko: Path) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)", ko.read_bytes())
    if not m:
        return []
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d]


def module_order(mods: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[str]:
    """Paths (relative to ``mods``) of ``wanted`` and their dependencies, each after what
    it depends on: the ``insmod`` order. Reads ``depends=`` from each ``.ko``'s modinfo
    (the host has no depmod)."""
    index = {ko.name[:-3].replace("-", "_"): ko for ko in mods.rglob("*.ko")}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        ko = index.get(name)
        if ko is None:
            raise UvmAssetsError(f"kernel module {name} not in {mods.name} "
                               "(built in? compressed? another flavour?)")
        for dep in _depends(ko):
            visit(dep)
        order.append(str(ko.relative_to(mods)))

    for name in wanted:
        visit(name)
    return order
