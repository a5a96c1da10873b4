"""Importing a ~200 MB OCI image: isobox vs skopeo + umoci.

The image is generated deterministically (bench/oci_image.py: 3 gzip layers, ~6000 files,
~200 MB uncompressed) and cached under bench/.cache/. Each run starts from empty
destinations:

- isobox:  ``ISOBOX_ROOT=<fresh> isobox import <layout> bench:latest``
- peers:   ``skopeo copy oci:<layout>:latest oci:<fresh>/oci:latest`` then
           ``umoci unpack --image <fresh>/oci:latest <fresh>/bundle``

``ISOBOX_BIN`` overrides the isobox command (default: the repo's .venv/bin/isobox).
"""

from __future__ import annotations

import os
from pathlib import Path

from bench import oci_image
from bench.harness import (
    CACHE_DIR,
    REPO,
    Config,
    Report,
    Scenario,
    Step,
    fmt_bytes,
    log,
    measure,
)

NAME = "image_import"
TITLE = "import a ~200 MB OCI image (3 gzip layers, ~6000 files)"
ISOBOX_REF = "bench:latest"


def isobox_bin() -> Path:
    return Path(os.environ.get("ISOBOX_BIN") or REPO / ".venv" / "bin" / "isobox")


def scenarios(image: oci_image.ImageInfo) -> list[Scenario]:
    isobox = isobox_bin()
    src = image.path
    tag = image.ref

    def isobox_steps(d: Path) -> list[Step]:
        env = {"ISOBOX_ROOT": str(d / "root"), "ISOBOX_RUN": str(d / "run")}
        return [Step("isobox import", [isobox, "import", src, ISOBOX_REF], env=env)]

    def peer_steps(d: Path) -> list[Step]:
        return [
            Step(
                "skopeo copy",
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--quiet",
                    f"oci:{src}:{tag}",
                    f"oci:{d / 'oci'}:{tag}",
                ],
            ),
            Step(
                "umoci unpack", ["umoci", "unpack", "--image", f"{d / 'oci'}:{tag}", d / "bundle"]
            ),
        ]

    return [
        Scenario(
            "isobox import",
            isobox_steps,
            baseline=True,
            requires=[isobox],
            probe=[isobox, "import", "--help"],
            versions={
                "isobox": [
                    isobox.parent / "python",
                    "-c",
                    "import isobox; print(isobox.__version__)",
                ]
            },
            output=lambda d: d / "root",
        ),
        Scenario(
            "skopeo copy + umoci unpack",
            peer_steps,
            requires=["skopeo", "umoci"],
            versions={"skopeo": ["skopeo", "--version"], "umoci": ["umoci", "--version"]},
            output=lambda d: d,
        ),
    ]


def run(config: Config) -> Report:
    log(f"{NAME}: preparing the test image (generated once, cached in {CACHE_DIR})")
    image = oci_image.ensure_image(CACHE_DIR)
    log(
        f"{NAME}: image {image.path.name}: {fmt_bytes(image.uncompressed_bytes)} "
        f"uncompressed, {fmt_bytes(image.compressed_bytes)} compressed, {image.files} files"
    )
    report = measure(
        NAME,
        TITLE,
        scenarios(image),
        config,
        params={
            "image": str(
                image.path.relative_to(REPO) if image.path.is_relative_to(REPO) else image.path
            ),
            "generator version": oci_image.GENERATOR_VERSION,
            "manifest": image.manifest_digest,
            "layers": image.layers,
            "uncompressed": fmt_bytes(image.uncompressed_bytes),
            "compressed (gzip -6)": fmt_bytes(image.compressed_bytes),
            "files, symlinks, hardlinks": image.files,
            "directories (summed over layers)": image.dirs,
        },
        notes=[
            "Time is wall time of whole commands, process start included (for isobox: the "
            "Python interpreter and its imports).",
            "Every scenario ran once untimed before the timed rounds, so the source image, "
            "the tools' binaries and Python's imports are in the page cache for both sides "
            "alike; the page cache is not dropped between rounds. `sync` runs untimed "
            "before every timed run.",
            "Each run writes into new, empty directories (a fresh ISOBOX_ROOT for isobox; "
            "a fresh destination layout and bundle for skopeo + umoci), deleted untimed "
            "afterwards: no run profits from an earlier one's output.",
            "skopeo copies the compressed blobs, checking their digests; umoci unpack "
            "decompresses and extracts the layers as root and writes an mtree manifest of "
            "the rootfs. skopeo runs with --insecure-policy (no signature policy file "
            "needed; the policy would accept anything for a local layout anyway).",
            "ratio = a scenario's median / isobox's median; above 1 means slower than isobox.",
        ],
        extra_tools={"isobox commit": ["git", "-C", REPO, "describe", "--always", "--dirty"]},
    )
    sized = [o for o in report.outcomes if o.output_bytes is not None]
    if sized:
        report.notes.append(
            "What one run leaves on disk: "
            + "; ".join(
                f"{o.name}: {fmt_bytes(o.output_bytes or 0)} in {o.output_files} entries"
                for o in sized
            )
            + "."
        )
    return report
