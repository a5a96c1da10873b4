"""The compute service: state, names, lookups, validation and the release list (these run
without monitors), then real containers end to end (further below)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from isobox.compute.service import ComputeService, parse_signal
from isobox.errors import Conflict, ImageNotFound, InvalidArgument, InvalidDocument, NotFound
from isobox.spec.compute import ComputeSystem, parse_document
from isobox.storage.bootstrap import bootstrap_busybox
from isobox.storage.store import ImageStore


def doc(**kw: object) -> ComputeSystem:
    base: dict[str, object] = {"schemaVersion": "1.0", "image": "busybox:latest"}
    base.update(kw)
    return parse_document(base)


@pytest.fixture
def svc(isobox_env: Path) -> Iterator[ComputeService]:
    """A service on the test's own root with the busybox image, opened without monitors."""
    store = ImageStore()
    bootstrap_busybox(store)
    store.close()
    s = ComputeService()
    s.open(monitors=False)
    yield s
    s.close()


def leftovers(s: ComputeService) -> dict[str, object]:
    """Everything a container could leave behind in the state and on disk."""
    return {
        "rows": [r.id for r in s.db.all()],
        "allocations": s.db.db.query("SELECT * FROM allocations"),
        "leases": s.store.db.query("SELECT * FROM leases"),
        "containers": sorted(os.listdir(s.root / "containers")),
        "run": sorted(os.listdir(s.run / "containers")),
    }


EMPTY = {"rows": [], "allocations": [], "leases": [], "containers": [], "run": []}


# ---- create, lookups, names ---------------------------------------------------------


def test_create_makes_row_folder_scratch_and_plan(svc: ComputeService) -> None:
    res = svc.create(doc(name="web", labels={"tier": "front"}))
    assert res["name"] == "web" and len(res["id"]) == 64 and res["warnings"] == []
    info = svc.inspect("web")
    assert info["state"] == "created" and info["id"] == res["id"]
    assert info["imageId"].startswith("sha256:") and info["image"] == "busybox:latest"
    assert info["pid"] == 0 and info["exitCode"] is None and info["startedAt"] is None
    assert info["labels"] == {"tier": "front"}
    assert info["document"]["id"] == res["id"] and info["document"]["name"] == "web"
    cdir = svc.container_dir(res["id"])
    assert (cdir / "plan.json").is_file() and (cdir / "scratch" / "upper").is_dir()
    assert info["scratch"] == str(cdir / "scratch")
    kinds = [a.kind for a in svc.db.allocations(res["id"])]
    assert kinds == ["plan", "scratch", "dir"]  # newest first: the order they are freed in
    assert svc.store.leases(f"container:{res['id']}")


def test_refs_by_id_prefix_and_name(svc: ComputeService) -> None:
    a = svc.create(doc(id="ab" + "0" * 62, name="one"))
    b = svc.create(doc(id="ac" + "0" * 62, name="two"))
    assert svc.inspect("ab")["id"] == a["id"]
    assert svc.inspect("two")["id"] == b["id"]
    assert svc.inspect(a["id"])["name"] == "one"
    with pytest.raises(NotFound, match="ambiguous"):
        svc.inspect("a")
    for call in (lambda: svc.inspect("nope"), lambda: svc.remove("nope"),
                 lambda: svc.start("nope"), lambda: svc.kill("nope"),
                 lambda: svc.pause("nope"), lambda: svc.wait("nope", timeout=0.1),
                 lambda: list(svc.logs("nope"))):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.http_status == 404


def test_name_is_unique_even_under_a_race(svc: ComputeService) -> None:
    svc.create(doc(name="dup"))
    with pytest.raises(Conflict, match="already in use") as info:
        svc.create(doc(name="dup"))
    assert info.value.http_status == 409
    wins: list[str] = []
    losses: list[Exception] = []

    def one() -> None:
        try:
            wins.append(svc.create(doc(name="race"))["id"])
        except Conflict as exc:
            losses.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 5
    # The losers left nothing: one folder per container that exists.
    assert sorted(os.listdir(svc.root / "containers")) == sorted(r.id for r in svc.db.all())


def test_same_id_twice_is_a_conflict(svc: ComputeService) -> None:
    cid = "f" * 64
    svc.create(doc(id=cid, name="x1"))
    with pytest.raises(Conflict):
        svc.create(doc(id=cid, name="x2"))
    assert svc.inspect(cid)["name"] == "x1"


def test_generated_names_are_distinct(svc: ComputeService) -> None:
    names = {svc.create(doc())["name"] for _ in range(20)}
    assert len(names) == 20
    assert all("_" in n for n in names)


def test_validation_errors(svc: ComputeService) -> None:
    with pytest.raises(ImageNotFound):
        svc.create(doc(image="nosuch:1"))
    with pytest.raises(InvalidArgument, match="vm isolation is not available yet"):
        svc.create(doc(isolation="vm"))
    with pytest.raises(InvalidDocument):
        doc(name="bad name")
    res = svc.create(doc(name="v"))
    with pytest.raises(InvalidArgument, match="vm isolation is not available yet"):
        svc.start(res["id"], isolation="vm")
    with pytest.raises(InvalidArgument, match="signal"):
        parse_signal("SIGNOPE")
    assert parse_signal("term") == 15 and parse_signal("SIGKILL") == 9 and parse_signal(9) == 9
    with pytest.raises(InvalidArgument):
        svc.wait("v", condition="whenever")
    with pytest.raises(InvalidArgument):
        list(svc.events(filters={"colour": "red"}, follow=False))
    assert leftovers(svc)["rows"] == [res["id"]]


def test_actions_in_the_wrong_state_are_conflicts(svc: ComputeService) -> None:
    svc.create(doc(name="idle"))
    for call in (lambda: svc.pause("idle"), lambda: svc.resume("idle"),
                 lambda: svc.kill("idle"), lambda: svc.top("idle")):
        with pytest.raises(Conflict, match="it is created"):
            call()
    svc.stop("idle")  # a container that does not run is left as it is


def test_enumerate_filters(svc: ComputeService) -> None:
    svc.create(doc(name="a1", labels={"app": "x", "tier": "db"}))
    svc.create(doc(name="a2", labels={"app": "y"}, isolation="host"))
    svc.create(doc(name="b3"))
    names = lambda **kw: sorted(i["name"] for i in svc.enumerate(**kw))  # noqa: E731
    assert names() == ["a1", "a2", "b3"]
    assert names(name="a") == ["a1", "a2"]
    assert names(isolation="host") == ["a2"]
    assert names(labels={"app": None}) == ["a1", "a2"]
    assert names(labels={"app": "x"}) == ["a1"]
    assert names(labels={"app": "x", "tier": "web"}) == []
    assert names(states=["created"]) == ["a1", "a2", "b3"]
    assert names(states=["running"]) == []
    assert svc.info()["containers"] == {"created": 3}


# ---- failures roll back; removal frees everything ------------------------------------


def test_create_failure_leaves_nothing(svc: ComputeService) -> None:
    # No command at all: the plan step (after the folder and the scratch layer) fails.
    with pytest.raises(InvalidArgument, match="no command"):
        svc.create(doc(name="nocmd", process={"entrypoint": []}))
    assert leftovers(svc) == EMPTY
    svc.create(doc(name="nocmd"))  # and the name is free again


def test_create_failure_when_the_folder_cannot_be_made(svc: ComputeService) -> None:
    cid = "e" * 64
    (svc.root / "containers" / cid).write_text("in the way")
    with pytest.raises(Exception, match="create container folder"):
        svc.create(doc(id=cid, name="blocked"))
    # The folder was never ours: release removes what its record names, a file it could
    # not have made is left... but the row and the lease are gone.
    assert svc.db.all() == [] and svc.db.db.query("SELECT * FROM allocations") == []
    assert svc.store.db.query("SELECT * FROM leases") == []


def test_remove_frees_in_reverse_order(svc: ComputeService,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    res = svc.create(doc(name="gone"))
    order: list[str] = []
    real = svc._release_one

    def spy(cid: str, a: object) -> None:
        order.append(a.kind)  # type: ignore[attr-defined]
        real(cid, a)  # type: ignore[arg-type]

    monkeypatch.setattr(svc, "_release_one", spy)
    svc.remove("gone")
    assert order == ["plan", "scratch", "dir"]
    assert leftovers(svc) == EMPTY
    with pytest.raises(NotFound):
        svc.inspect(res["id"])


def test_events_history_and_filters(svc: ComputeService) -> None:
    a = svc.create(doc(name="e1", labels={"k": "v"}))
    svc.create(doc(name="e2"))
    svc.remove("e1")
    evs = list(svc.events(follow=False))
    assert [(e["action"], e["name"]) for e in evs] == [
        ("create", "e1"), ("create", "e2"), ("destroy", "e1")]
    assert evs[0]["id"] == a["id"] and evs[0]["type"] == "container"
    assert evs[0]["attributes"]["image"] == "busybox:latest"
    only = list(svc.events(follow=False, filters={"container": "e1"}))
    assert [e["action"] for e in only] == ["create", "destroy"]
    assert [e["name"] for e in svc.events(follow=False, filters={"event": "destroy"})] == ["e1"]
    assert [e["name"] for e in svc.events(follow=False, filters={"label": "k=v"})] == [
        "e1", "e1"]
    assert list(svc.events(follow=False, since=evs[-1]["time"])) == [evs[-1]]
    assert list(svc.events(follow=False, until="2000-01-01T00:00:00Z")) == []


def test_events_follow_sees_new_events(svc: ComputeService) -> None:
    got: list[str] = []
    stream = svc.events(follow=True)

    def reader() -> None:
        for e in stream:
            got.append(e["action"])
            if len(got) == 2:
                return

    t = threading.Thread(target=reader)
    t.start()
    import time

    time.sleep(0.2)
    svc.create(doc(name="f1"))
    svc.remove("f1")
    t.join(10)
    assert got == ["create", "destroy"]
