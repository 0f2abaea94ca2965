"""The local manifests source: real files in a temporary directory."""

from __future__ import annotations

import asyncio
import logging
import os

from controlplane.local_source import LocalSource

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"
POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: %s, namespace: shop}\nspec: {nodeName: n1}\n"


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    # make the change visible even on filesystems with coarse mtimes
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_initial_resync_then_deltas(tmp_path):
    write(tmp_path / "a.yaml", NS + "---\n" + POD % "p1")
    write(tmp_path / "b.json", '{"apiVersion": "v1", "kind": "List", "items": ['
          '{"kind": "Pod", "metadata": {"name": "p2", "namespace": "shop"}}]}')  # fmt: skip
    write(tmp_path / "notes.txt", "not a manifest")
    src = LocalSource(str(tmp_path))
    u = src.poll()
    assert u is not None and u.resync
    assert set(u.upserts) == {"Namespace//shop", "Pod/shop/p1", "Pod/shop/p2"}
    assert src.poll() is None  # nothing changed

    write(tmp_path / "a.yaml", NS + "---\n" + (POD % "p1").replace("n1", "n2"))
    u = src.poll()
    assert u is not None and not u.resync
    assert set(u.upserts) == {"Pod/shop/p1"} and u.deletes == set()
    assert u.upserts["Pod/shop/p1"]["spec"]["nodeName"] == "n2"

    os.remove(tmp_path / "b.json")
    u = src.poll()
    assert u is not None and u.upserts == {} and u.deletes == {"Pod/shop/p2"}


def test_same_content_rewritten_is_no_change(tmp_path):
    write(tmp_path / "a.yml", NS)
    src = LocalSource(str(tmp_path))
    assert src.poll() is not None
    write(tmp_path / "a.yml", NS)  # new mtime, same bytes
    assert src.poll() is None


def test_broken_file_keeps_previous_objects(tmp_path, caplog):
    write(tmp_path / "a.yaml", NS + "---\n" + POD % "p1")
    src = LocalSource(str(tmp_path))
    src.poll()
    write(tmp_path / "a.yaml", NS + "---\nkind: Pod\nmetadata: {name: [oops\n")
    with caplog.at_level(logging.ERROR, logger="controlplane.local_source"):
        assert src.poll() is None  # nothing is deleted
    msgs = [r.getMessage() for r in caplog.records]
    assert any("a.yaml:" in m and "previous objects stay" in m for m in msgs), msgs
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="controlplane.local_source"):
        write(tmp_path / "a.yaml", NS + "---\nkind: Pod\nmetadata: {name: [oops\n")
        assert src.poll() is None
    assert caplog.records == []  # the same broken content is reported once
    write(tmp_path / "a.yaml", NS)  # fixed: now p1 is really gone
    u = src.poll()
    assert u is not None and u.deletes == {"Pod/shop/p1"}


def test_object_without_name_is_a_file_error(tmp_path, caplog):
    write(tmp_path / "a.yaml", NS + "---\nkind: Pod\nmetadata: {namespace: shop}\n")
    src = LocalSource(str(tmp_path))
    with caplog.at_level(logging.ERROR, logger="controlplane.local_source"):
        u = src.poll()
    assert u is not None and u.resync and u.upserts == {}
    assert any("document 2" in r.getMessage() for r in caplog.records)


def test_single_file_and_missing_path(tmp_path):
    f = tmp_path / "one.yaml"
    src = LocalSource(str(f))
    u = src.poll()
    assert u is not None and u.resync and u.upserts == {}
    write(f, NS)
    u = src.poll()
    assert u is not None and set(u.upserts) == {"Namespace//shop"}
    os.remove(f)
    assert src.poll() is None  # a vanished path keeps what was there


def test_run_delivers_to_sink(tmp_path):
    write(tmp_path / "a.yaml", NS)
    got = []
    src = LocalSource(str(tmp_path), got.append, interval=0.01)

    async def main():
        task = asyncio.create_task(src.run())
        for _ in range(500):
            if got:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert got and got[0].resync and set(got[0].upserts) == {"Namespace//shop"}
