from __future__ import annotations

import pytest

from isobox.errors import InvalidReference
from isobox.spec.reference import parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "name", "tag", "digest"),
    [
        ("busybox", "busybox", "latest", None),
        ("busybox:1.36", "busybox", "1.36", None),
        ("localhost:5000/team/app:v2", "localhost:5000/team/app", "v2", None),
        ("localhost:5000/app", "localhost:5000/app", "latest", None),
        (f"busybox@{DIGEST}", "busybox", None, DIGEST),
        (f"busybox:1@{DIGEST}", "busybox", "1", DIGEST),
    ],
)
def test_parse(text: str, name: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.name, ref.tag, ref.digest) == (name, tag, digest)


@pytest.mark.parametrize(
    "text", ["", "Busybox", "busybox:", "busy box", "a@sha256:12", "../etc", "x:" + "t" * 200]
)
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_familiar_names() -> None:
    from isobox.spec.reference import familiar

    assert familiar("docker.io/library/busybox:1") == "busybox:1"
    assert familiar("docker.io/team/app") == "team/app"
    assert familiar("quay.io/x/y:2") == "quay.io/x/y:2"
