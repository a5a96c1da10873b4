"""Review of issue 5: documents the API accepts although it must refuse them.

"A malformed document or unknown field → 400 naming the field; nothing created". Each case
here is a document that ``POST /v1/compute-systems`` answers 201 today although it names
something that can never be valid (a container folder, cgroup or name with a newline in
it, a cpuset the kernel refuses at every start). A real isoboxd, through tests/daemonkit.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemonkit import Daemon, assert_nothing_left, short_run_dir

pytestmark = [pytest.mark.root, pytest.mark.overlay, pytest.mark.cgroup1]


@pytest.fixture
def daemon(isobox_env: Path) -> Iterator[Daemon]:
    with short_run_dir() as run:
        d = Daemon.start(isobox_env, run)
        ids: list[str] = []
        try:
            r = d.request("POST", "/v1/images/bootstrap", json={"kind": "busybox"})
            assert r.status == 201, r.text
            yield d
        finally:
            try:
                for info in d.request("GET", "/v1/compute-systems").json():
                    ids.append(info["id"])
                    d.request("DELETE", "/v1/compute-systems/" + info["id"].strip(),
                              query={"force": 1})
            finally:
                d.stop()
            assert_nothing_left(isobox_env, run, [i.strip() for i in ids])


def _doc(**kw: Any) -> dict[str, Any]:
    return {"schemaVersion": "1.0", "image": "busybox:latest",
            "process": {"args": ["true"]}, **kw}


def _container_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "containers").iterdir())


@pytest.mark.parametrize(("extra", "field"), [
    ({"id": "ab" * 32 + "\n"}, "id"),
    ({"name": "web\n"}, "name"),
    ({"network": {"hostname": "box\n"}}, "network.hostname"),
])
def test_review_trailing_newline_is_refused(daemon: Daemon, isobox_env: Path,
                                            extra: dict[str, Any], field: str) -> None:
    """spec/compute.py validates with ``re.match(r"^...$")``: ``$`` also matches before a
    trailing newline, so ``"<64 hex>\\n"`` passes as an id (a container folder and cgroup
    named with a newline: it can never start, ``mkdir .../isobox/<id>\\n: EINVAL``), as
    does a name or hostname ending in a newline."""
    r = daemon.request("POST", "/v1/compute-systems", json=_doc(**extra))
    assert r.status == 400, f"accepted {extra!r}: {r.status} {r.text}"
    assert r.error["kind"] == "InvalidDocument" and r.error["field"] == field, r.text
    assert _container_dirs(isobox_env) == []


def test_review_bad_cpuset_is_refused_at_create(daemon: Daemon, isobox_env: Path) -> None:
    """``resources.cpuset`` is only checked for host isolation (plan.host_limits calls
    parse_cpuset); a process-isolated container is created with ``"garbage"`` and then every
    start fails with ``writing 'garbage' to .../cpuset.cpus: Invalid argument``."""
    r = daemon.request("POST", "/v1/compute-systems",
                       json=_doc(resources={"cpuset": "garbage"}))
    assert r.status == 400, f"accepted a cpuset of 'garbage': {r.status} {r.text}"
    assert "cpuset" in (r.error.get("field") or r.error["message"]), r.text
    assert _container_dirs(isobox_env) == []
