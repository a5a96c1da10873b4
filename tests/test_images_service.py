"""The daemon's image service (isobox.compute.images.ImageService) on a real store."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from imagekit import d, f, oci_layout, tar_bytes
from isobox.compute.images import ImageService
from isobox.errors import ImageInUse, ImageNotFound, InvalidArgument, InvalidReference
from isobox.storage.store import ImageStore

pytestmark = pytest.mark.root


@pytest.fixture
def service() -> ImageService:
    return ImageService(ImageStore())


def _oci_tar(tmp_path: Path) -> bytes:
    layout = tmp_path / "layout"
    oci_layout(layout, [tar_bytes([d("etc"), f("etc/hello", "hi\n")])])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for child in sorted(layout.iterdir()):
            tar.add(child, arcname=child.name)
    return buf.getvalue()


def _tmp_is_empty(svc: ImageService) -> bool:
    return os.listdir(svc.store.root / "tmp") == []


def test_import_stream_list_inspect_tag_remove(service: ImageService, tmp_path: Path) -> None:
    info = service.import_stream(io.BytesIO(_oci_tar(tmp_path)), "svc/test:1")
    assert info["tags"] == ["svc/test:1"] and info["layers"] == 1
    assert info["id"].startswith("sha256:") and info["digest"].startswith("sha256:")
    assert _tmp_is_empty(service)  # the spool is gone
    assert service.list() == [info]
    doc = service.inspect("svc/test:1")
    assert doc["config"]["rootfs"]["diff_ids"] == [doc["layers"][0]["diff_id"]]
    assert Path(doc["layer_dirs"][0], "etc", "hello").read_text() == "hi\n"
    service.tag("svc/test:1", "svc/other:2")
    assert service.list()[0]["tags"] == ["svc/other:2", "svc/test:1"]
    with pytest.raises(ImageInUse):
        service.remove(info["id"])
    assert service.remove("svc/other:2") == {"untagged": ["svc/other:2"], "deleted": []}
    assert service.remove("svc/test:1") == {"untagged": ["svc/test:1"],
                                            "deleted": [info["digest"]]}
    assert service.list() == []


def test_a_rootfs_tar_stream_becomes_an_image(service: ImageService) -> None:
    layer = tar_bytes([d("bin"), f("bin/tool", "#!/bin/sh\n", mode=0o755)])
    info = service.import_stream(io.BytesIO(layer), "svc/rootfs:1")
    assert info["layers"] == 1
    doc = service.inspect("svc/rootfs:1")
    assert Path(doc["layer_dirs"][0], "bin", "tool").stat().st_mode & 0o111


def test_bad_imports_are_refused_and_leave_nothing(service: ImageService) -> None:
    class Exploding(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
            raise AssertionError("the body must not be read when the tag is bad")

    with pytest.raises(InvalidReference):
        service.import_stream(Exploding(), "Not A Name")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="empty"):
        service.import_stream(io.BytesIO(b""), "svc/empty:1")
    with pytest.raises(InvalidArgument, match="neither a directory nor a tar"):
        service.import_stream(io.BytesIO(b"not a tar at all" * 100), "svc/junk:1")
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(Exception, match=r"escape|outside"):
        service.import_stream(io.BytesIO(evil.getvalue()), "svc/evil:1")
    assert service.list() == []
    assert _tmp_is_empty(service)


def test_export_round_trips_and_fails_before_the_first_byte(
    service: ImageService, tmp_path: Path
) -> None:
    original = service.import_stream(io.BytesIO(_oci_tar(tmp_path)), "svc/test:1")
    for fmt in ("oci", "docker"):
        chunks = service.export("svc/test:1", fmt)
        data = b"".join(chunks)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
        assert ("index.json" in names) == (fmt == "oci") and "manifest.json" in names
        back = service.import_stream(io.BytesIO(data), f"svc/back:{fmt}")
        assert back["id"] == original["id"]  # the same config: the same image
    assert _tmp_is_empty(service)
    with pytest.raises(ImageNotFound):
        service.export("svc/absent:1")  # raised by the call itself, not while iterating
    with pytest.raises(InvalidArgument, match="format"):
        service.export("svc/test:1", "tarball")
    # An export abandoned half-way leaves nothing behind either.
    it = service.export("svc/test:1")
    next(it)
    it.close()  # type: ignore[attr-defined]
    assert _tmp_is_empty(service)


def test_prune_and_bootstrap(service: ImageService, tmp_path: Path) -> None:
    info = service.bootstrap("busybox")
    assert info["tags"] == ["busybox:latest"]
    named = service.bootstrap("busybox", "base/bb:1")
    assert named["id"] == info["id"]  # a deterministic build: the same image
    with pytest.raises(InvalidArgument, match="unknown bootstrap kind"):
        service.bootstrap("windows")
    imported = service.import_stream(io.BytesIO(_oci_tar(tmp_path)), "svc/test:1")
    service.remove("svc/test:1")
    report = service.prune()
    assert set(report) == {"images_removed", "blobs_removed", "layers_removed",
                           "staging_removed", "bytes_freed"}
    assert report["images_removed"] == []  # remove already deleted the untagged image
    assert [i["id"] for i in service.list()] == [info["id"]]
    assert imported["id"] != info["id"]
