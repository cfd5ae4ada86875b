"""The artifact store keeps what a stage committed: through the CLI on the tiny data recipe.

One cold run is shared by the tests below: `vlmflow export` into the store is refused and
writes nothing; every committed file is read-only; `vlmflow verify` passes, then names a file
changed, deleted or added (on a copy of the run and its store, so the tests do not depend on
their order); a second run still finds every stage cached.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from test_recipe_cli import SPEC, stages, summary_of, vlmflow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("integrity")
    result = vlmflow("run", str(SPEC), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def _artifact(workdir: Path, stage: str) -> Path:
    return workdir / "artifacts" / stage / stages(summary_of(workdir))[stage]["artifact_digest"]


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` with its size, mtime and mode (what a write would move)."""
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns, p.lstat().st_mode)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def copy(workdir: Path, tmp_path: Path) -> Path:
    """The run's folders and its store, copied (modes and the `latest` link kept)."""
    for name in ("runs", "artifacts"):
        shutil.copytree(workdir / name, tmp_path / name, symlinks=True)
    return tmp_path


def verify(workdir: Path, *args: str):
    return vlmflow("verify", *args, "--workdir", str(workdir), timeout=120)


def _line(output: str, stage: str) -> str:
    return next(line for line in output.splitlines() if line.strip().startswith(f"{stage}/"))


def test_a_fresh_run_verifies(workdir):
    result = verify(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = summary_of(workdir)["run_id"]
    assert result.stdout.splitlines()[0].startswith(f"run {run_id}  recipe data-tiny")
    for stage in ("ingest", "dedup", "tokenizer"):
        assert _line(result.stdout, stage).split()[1] == "ok", result.stdout
    assert verify(workdir, run_id).returncode == 0  # by run id, as lineage takes it
    assert verify(workdir, str(workdir / "runs" / run_id)).returncode == 0  # by folder
    missing = verify(workdir, "no-such-run")
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr


def test_export_into_the_store_is_refused_and_writes_nothing(workdir, tmp_path):
    store = workdir / "artifacts"
    model = _artifact(workdir, "tokenizer")
    (tmp_path / "into-store").symlink_to(store / "dedup")
    before = _snapshot(store)
    outs = [
        model,  # a committed artifact: the reported overwrite
        store / "exports" / "llava",  # anywhere in the store, even where nothing is yet
        workdir / "runs" / ".." / "artifacts" / "x",  # `..` resolved
        tmp_path / "into-store" / "x",  # a symlink resolved
    ]
    for out in outs:
        result = vlmflow("export", "latest", str(out), "--workdir", str(workdir), timeout=120)
        assert result.returncode != 0, result.stdout
        assert result.stderr.strip().splitlines() == [
            f"error: OUT {out} is inside the artifact store {store}: choose a folder outside it"
        ]
    # Without --workdir: the store is found from the run folder named.
    result = vlmflow("export", str(workdir / "runs" / "latest"), str(model / "model"), timeout=120)
    assert result.returncode != 0 and "is inside the artifact store" in result.stderr, result.stderr
    csv = vlmflow("compare", "latest", "--csv", str(store / "compare.csv"), "--workdir", str(workdir), timeout=120)
    assert csv.returncode != 0 and f"--csv {store / 'compare.csv'} is inside the artifact store" in csv.stderr
    assert _snapshot(store) == before
    assert verify(workdir).returncode == 0


def test_committed_files_are_read_only(workdir):
    for stage in ("ingest", "dedup", "tokenizer"):
        folder = _artifact(workdir, stage)
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert {"_SUCCESS", "_MANIFEST.json"} <= {p.name for p in files}
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path
            if os.geteuid() != 0:  # root may write whatever the mode says
                assert not os.access(path, os.W_OK), path
        for sub in (folder, *(p for p in folder.rglob("*") if p.is_dir())):
            assert sub.stat().st_mode & stat.S_IWUSR, sub  # removable


def test_a_changed_file_is_named(copy):
    shard = sorted((_artifact(copy, "ingest") / "shards").iterdir())[0]
    os.chmod(shard, stat.S_IMODE(shard.stat().st_mode) | stat.S_IWUSR)
    with open(shard, "ab") as handle:
        handle.write(b"\0")
    result = verify(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"drift: 1 files changed, 0 missing, 0 extra: changed shards/{shard.name}" in _line(result.stdout, "ingest")
    assert _line(result.stdout, "dedup").split()[1] == "ok"
    assert "1 of 3 stages differ" in result.stderr


def test_a_deleted_file_is_missing_and_an_added_one_extra(copy):
    folder = _artifact(copy, "tokenizer")
    (folder / "tokenizer.json").unlink()
    (_artifact(copy, "dedup") / "notes.txt").write_text("added by hand")
    result = verify(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "drift: 0 files changed, 1 missing, 0 extra: missing tokenizer.json" in _line(result.stdout, "tokenizer")
    assert "drift: 0 files changed, 0 missing, 1 extra: extra notes.txt" in _line(result.stdout, "dedup")


def test_an_artifact_without_a_manifest_passes(copy):
    os.unlink(_artifact(copy, "dedup") / "_MANIFEST.json")
    result = verify(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no manifest (committed before vlmflow recorded one)" in _line(result.stdout, "dedup")


def test_a_second_run_reuses_the_read_only_artifacts(workdir):
    result = vlmflow("run", str(SPEC), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {s["status"] for s in summary_of(workdir)["stages"]} == {"cached"}
    assert verify(workdir).returncode == 0
