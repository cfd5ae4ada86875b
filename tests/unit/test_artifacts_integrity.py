"""Committed artifacts: the content manifest written before `_SUCCESS`, read-only files, the
check `vlmflow verify` runs, and the guard that keeps user-named outputs out of the store."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from vlmflow.artifacts import (
    MANIFEST,
    SUCCESS,
    ArtifactStore,
    check_manifest,
    file_sha256,
    manifest_of,
    store_holding,
)


def _build(store: ArtifactStore, stage: str = "s", digest: str = "d1") -> Path:
    partial = store.partial(stage, digest)
    (partial / "shards").mkdir()
    (partial / "shards" / "shard-0.tar").write_bytes(b"tar" * 1000)
    (partial / "manifest.parquet").write_bytes(b"PAR1data")
    (partial / "empty.txt").write_text("")
    return store.commit(stage, digest, {"rows": 3, "seconds": 1.5})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_commit_records_every_file_before_success(tmp_path):
    final = _build(ArtifactStore(tmp_path))
    recorded = json.loads((final / MANIFEST).read_text())
    assert recorded["format"] == 1
    assert sorted(recorded["files"]) == ["empty.txt", "manifest.parquet", "shards/shard-0.tar"]  # not _SUCCESS
    shard = final / "shards" / "shard-0.tar"
    assert recorded["files"]["shards/shard-0.tar"] == {"sha256": file_sha256(shard), "size": 3000}
    assert recorded["files"]["empty.txt"]["size"] == 0
    assert json.loads((final / SUCCESS).read_text()) == {"rows": 3, "seconds": 1.5}
    assert sorted(p.name for p in final.parent.iterdir()) == ["d1"]  # no temp files, no partial left


def test_the_manifest_is_the_same_for_the_same_files(tmp_path):
    """Two builds of the same bytes (timings in _SUCCESS aside) give the same manifest bytes."""
    a = _build(ArtifactStore(tmp_path / "a"))
    b = ArtifactStore(tmp_path / "b")
    partial = b.partial("s", "d1")
    shutil.copytree(a, partial, dirs_exist_ok=True, ignore=shutil.ignore_patterns(SUCCESS, MANIFEST))
    final = b.commit("s", "d1", {"rows": 3, "seconds": 9.0})
    assert (final / MANIFEST).read_bytes() == (a / MANIFEST).read_bytes()


def test_committed_files_are_read_only_and_folders_stay_removable(tmp_path):
    store = ArtifactStore(tmp_path)
    final = _build(store)
    files = [p for p in final.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"shard-0.tar", "manifest.parquet", "empty.txt", MANIFEST, SUCCESS}
    for path in files:
        assert _mode(path) & 0o222 == 0, path
        if os.geteuid() != 0:  # root writes whatever the mode says
            assert not os.access(path, os.W_OK), path
    for folder in (final, final / "shards"):
        assert _mode(folder) & stat.S_IWUSR, folder
    assert store.is_complete("s", "d1")
    shutil.rmtree(final)  # what removing an artifact does
    assert not final.exists()


def test_a_partial_left_read_only_by_a_dead_commit_is_writable_again(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.partial("s", "d1")
    (partial / "unit-0").write_text("done")
    os.chmod(partial / "unit-0", 0o444)  # as commit leaves it just before the rename
    again = store.partial("s", "d1")
    assert again == partial and _mode(partial / "unit-0") & stat.S_IWUSR
    assert (partial / "unit-0").read_text() == "done"


def test_a_symlink_is_recorded_by_its_text_and_its_target_left_alone(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not the store's")
    store = ArtifactStore(tmp_path / "artifacts")
    partial = store.partial("s", "d1")
    (partial / "data.bin").write_bytes(b"x")
    (partial / "link").symlink_to(outside)
    final = store.commit("s", "d1", {})
    assert json.loads((final / MANIFEST).read_text())["files"]["link"] == {"link": str(outside)}
    assert _mode(outside) & stat.S_IWUSR  # not followed by chmod
    assert check_manifest(final).ok
    (final / "link").unlink()
    (final / "link").symlink_to(tmp_path)
    assert check_manifest(final).changed == ["link"]


def test_check_passes_on_an_untouched_artifact(tmp_path):
    drift = check_manifest(_build(ArtifactStore(tmp_path)))
    assert drift is not None and drift.ok and drift.files == 3
    assert drift.describe() == "ok (3 files)"


def test_check_finds_changed_missing_and_extra_files(tmp_path):
    final = _build(ArtifactStore(tmp_path))
    shard = final / "shards" / "shard-0.tar"
    os.chmod(shard, 0o644)
    with open(shard, "ab") as handle:
        handle.write(b"!")
    (final / "empty.txt").unlink()
    (final / "shards" / "stray.tar").write_bytes(b"")
    drift = check_manifest(final)
    assert (drift.changed, drift.missing, drift.extra) == (["shards/shard-0.tar"], ["empty.txt"], ["shards/stray.tar"])
    assert not drift.ok
    assert drift.describe() == (
        "drift: 1 files changed, 1 missing, 1 extra: "
        "changed shards/shard-0.tar, missing empty.txt, extra shards/stray.tar"
    )


def test_check_reads_a_file_of_unchanged_size(tmp_path):
    final = _build(ArtifactStore(tmp_path))
    path = final / "manifest.parquet"
    os.chmod(path, 0o644)
    path.write_bytes(b"PAR1DATA")  # same size, other bytes
    assert check_manifest(final).changed == ["manifest.parquet"]


def test_check_names_at_most_five_files(tmp_path):
    store = ArtifactStore(tmp_path)
    partial = store.partial("s", "d1")
    for i in range(8):
        (partial / f"f{i}").write_text(str(i))
    final = store.commit("s", "d1", {})
    for i in range(8):
        (final / f"f{i}").unlink()
    line = check_manifest(final).describe()
    assert line.startswith("drift: 0 files changed, 8 missing, 0 extra: missing f0, ")
    assert line.count("missing f") == 5 and line.endswith(", and 3 more")


def test_an_artifact_committed_before_manifests_has_none(tmp_path):
    final = _build(ArtifactStore(tmp_path))
    os.unlink(final / MANIFEST)
    assert check_manifest(final) is None


def test_an_unreadable_manifest_is_drift(tmp_path):
    final = _build(ArtifactStore(tmp_path))
    os.chmod(final / MANIFEST, 0o644)
    (final / MANIFEST).write_text("{not json")
    drift = check_manifest(final)
    assert not drift.ok and drift.changed[0].startswith(f"{MANIFEST} (unreadable")


def test_manifest_of_leaves_out_the_bookkeeping_files(tmp_path):
    (tmp_path / SUCCESS).write_text("{}")
    (tmp_path / MANIFEST).write_text("{}")
    (tmp_path / ".hidden").write_text("h")
    assert list(manifest_of(tmp_path)) == [".hidden"]


def test_store_holding(tmp_path):
    store = tmp_path / "work" / "artifacts"
    final = _build(ArtifactStore(store), "ingest", "abc")
    (tmp_path / "link").symlink_to(store / "ingest")
    stores = [store]
    assert store_holding(final, stores) == store
    assert store_holding(store, stores) == store
    assert store_holding(store / "new" / "deeper", stores) == store  # need not exist
    assert store_holding(tmp_path / "work" / "runs" / ".." / "artifacts" / "x", stores) == store
    assert store_holding(tmp_path / "link" / "abc", stores) == store
    assert store_holding(tmp_path / "work" / "export", stores) is None
    assert store_holding(tmp_path / "work" / "artifacts-2", stores) is None
    # Another workdir's store, unknown to the caller: found by the committed artifact above the path.
    assert store_holding(final / "model", []) == store
    assert store_holding(tmp_path / "elsewhere", []) is None
