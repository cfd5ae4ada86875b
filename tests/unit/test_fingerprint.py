"""Content fingerprints of input files and digests of code: what stage cache keys are made of."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from vlmflow import fingerprint
from vlmflow.fingerprint import (
    PLUMBING,
    HashCache,
    clear_code_cache,
    code_closure,
    code_digest,
    code_manifest,
    fingerprint_path,
    fingerprint_value,
    remembering_code,
)


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file whose content the fingerprint code reads, in order."""
    reads: list[Path] = []
    real = fingerprint.file_sha256

    def counted(path: Path, *args: object) -> str:
        reads.append(Path(path))
        return real(path, *args)

    monkeypatch.setattr(fingerprint, "file_sha256", counted)
    return reads


@pytest.fixture
def trusting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember even files written a moment ago (the racy window off), so the cache is exercised."""
    monkeypatch.setattr(fingerprint, "RACY_NS", 0)


def make_tree(root: Path, n: int = 3) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i}.txt").write_text(f"file {i}\n")
    (root / "sub" / "a.json").write_text('{"a": 1}')
    (root / "sub" / "deeper" / "b.bin").write_bytes(b"\x00\x01\x02")
    return root


def rewrite_same_size(path: Path, text: str) -> None:
    """Rewrite `path` with same-size content and put its mtime back; wait until its ctime moved."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    for _ in range(200):
        path.write_text(text)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if path.stat().st_ctime_ns != before.st_ctime_ns:
            break
        time.sleep(0.01)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


# ------------------------------------------------------------------------------ files


def test_file_fingerprint_is_its_content_hash(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(b"hello")
    import hashlib

    expected = hashlib.sha256(b"hello").hexdigest()
    assert fingerprint_path(path, tmp_path, HashCache()) == {"path": "x.txt", "sha256": expected}
    assert fingerprint_path(path, None, HashCache()) == {"path": str(path), "sha256": expected}
    assert fingerprint_path(path) == {"path": str(path), "sha256": expected}


def test_same_size_rewrite_with_mtime_restored_changes_the_fingerprint(tmp_path: Path, trusting: None) -> None:
    """The cached entry is stale by size and mtime alone; ctime (moved by any write) catches it."""
    path = tmp_path / "data.txt"
    path.write_text("aaaa")
    cache = HashCache(tmp_path / "_cache" / "file-hashes.sqlite")
    first = fingerprint_path(path, tmp_path, cache)
    assert cache.hashed == 1
    assert fingerprint_path(path, tmp_path, cache) == first and cache.hits == 1  # remembered
    rewrite_same_size(path, "bbbb")
    second = fingerprint_path(path, tmp_path, cache)
    assert second != first
    assert second["sha256"] == fingerprint_path(path, tmp_path, HashCache())["sha256"]
    # and a fresh cache on the same sqlite file agrees
    assert fingerprint_path(path, tmp_path, HashCache(cache.path)) == second


def test_a_rewrite_in_the_same_tick_is_caught_by_the_racy_window(tmp_path: Path) -> None:
    """With the default window a just-written file is never remembered, whatever the timestamp granularity."""
    path = tmp_path / "data.txt"
    path.write_text("aaaa")
    cache = HashCache()
    first = fingerprint_path(path, tmp_path, cache)
    stat = path.stat()
    path.write_text("bbbb")  # at once: its ctime may equal the first one on a coarse clock
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint_path(path, tmp_path, cache) != first
    assert cache.hashed == 2 and cache.hits == 0


def test_touch_keeps_the_fingerprint_but_rehashes(tmp_path: Path, trusting: None, count_reads: list[Path]) -> None:
    path = tmp_path / "data.txt"
    path.write_text("payload")
    cache = HashCache()
    first = fingerprint_path(path, tmp_path, cache)
    fingerprint_path(path, tmp_path, cache)
    assert len(count_reads) == 1
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
    assert fingerprint_path(path, tmp_path, cache) == first
    assert len(count_reads) == 2  # the stat moved, so the content was read again: same hash


def test_folder_fingerprint_lists_files_sorted_and_recursive(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    (root / ".hidden").write_text("x")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "m.pyc").write_bytes(b"pyc")
    os.mkfifo(root / "pipe")  # never opened (it would block)
    got = fingerprint_path(root, tmp_path, HashCache())
    assert got["path"] == "data"
    names = [name for name, _ in got["files"]]
    assert names == ["f0.txt", "f1.txt", "f2.txt", "sub/a.json", "sub/deeper/b.bin"]
    assert "links" not in got
    assert json.loads(json.dumps(got)) == got


def test_folder_fingerprint_follows_changes(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    cache = HashCache()
    before = fingerprint_path(root, tmp_path, cache)
    (root / "sub" / "deeper" / "b.bin").write_bytes(b"\x00\x01\x03")
    changed = fingerprint_path(root, tmp_path, cache)
    assert changed != before
    (root / "sub" / "deeper" / "b.bin").write_bytes(b"\x00\x01\x02")
    assert fingerprint_path(root, tmp_path, cache) == before
    (root / "sub" / "a.json").rename(root / "sub" / "a2.json")  # a rename is a change
    assert fingerprint_path(root, tmp_path, cache) != before
    (root / "new.txt").write_text("")
    assert len(fingerprint_path(root, tmp_path, cache)["files"]) == 6


def test_folder_copied_with_its_base_keeps_its_fingerprint(tmp_path: Path) -> None:
    base = tmp_path / "machine1" / "project"
    make_tree(base / "specs" / "data")
    (base / "specs" / "recipe.yaml").write_text("name: x\n")
    value = {"images": base / "specs" / "data", "recipe": base / "specs" / "recipe.yaml", "name": "specs/data"}
    here = fingerprint_value(value, base, HashCache())
    copy = tmp_path / "machine2" / "elsewhere"
    shutil.copytree(base, copy)
    moved = {"images": copy / "specs" / "data", "recipe": copy / "specs" / "recipe.yaml", "name": "specs/data"}
    assert fingerprint_value(moved, copy, HashCache()) == here
    assert here["images"]["path"] == "specs/data" and here["recipe"]["path"] == "specs/recipe.yaml"
    assert here["name"] == "specs/data"  # strings are not paths
    # outside the base: named absolutely, so the two differ
    assert fingerprint_value(value, copy, HashCache()) != here
    assert fingerprint_path(base / "specs", base / "specs", HashCache())["path"] == "."


def test_missing_path(tmp_path: Path) -> None:
    assert fingerprint_path(tmp_path / "nope.txt", tmp_path, HashCache()) == {"path": "nope.txt", "missing": True}
    assert fingerprint_path(tmp_path / "a" / "b", None) == {"path": str(tmp_path / "a" / "b"), "missing": True}


def test_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("target content")
    (outside / "inner").mkdir()
    (outside / "inner" / "deep.txt").write_text("deep")
    root = tmp_path / "data"
    root.mkdir()
    (root / "real.txt").write_text("real")
    (root / "link.txt").symlink_to(outside / "target.txt")
    (root / "linked_dir").symlink_to(outside / "inner")
    (root / "loop").symlink_to(root)  # would cycle if followed
    (root / "dangling").symlink_to(tmp_path / "gone")
    got = fingerprint_path(root, tmp_path, HashCache())
    files = dict(got["files"])
    assert set(files) == {"real.txt", "link.txt"}
    assert files["link.txt"] == fingerprint_path(outside / "target.txt")["sha256"]
    assert got["links"] == [
        ["dangling", str(tmp_path / "gone")],
        ["linked_dir", str(outside / "inner")],
        ["loop", str(root)],
    ]
    # the target's content counts for a symlinked file
    (outside / "target.txt").write_text("target changed")
    assert fingerprint_path(root, tmp_path, HashCache()) != got


def test_fingerprint_value_walks_models_dataclasses_and_containers(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")

    class Cfg(BaseModel):
        path: Path
        paths: list[Path]
        label: str
        n: int = 3

    @dataclasses.dataclass
    class Holder:
        cfg: Cfg
        extra: tuple

    value = Holder(Cfg(path=tmp_path / "a.txt", paths=[tmp_path / "b.txt"], label="a.txt"), (1, None, 2.5))
    got = fingerprint_value({"holder": value, "set": {3, 1}}, tmp_path)
    a = fingerprint_path(tmp_path / "a.txt", tmp_path)
    assert got == {
        "holder": {
            "cfg": {"path": a, "paths": [{"path": "b.txt", "missing": True}], "label": "a.txt", "n": 3},
            "extra": [1, None, 2.5],
        },
        "set": [1, 3],
    }
    json.dumps(got)


# ------------------------------------------------------------------------------ the persistent cache


def test_second_cache_on_the_same_file_reads_no_content(
    tmp_path: Path, trusting: None, count_reads: list[Path]
) -> None:
    root = make_tree(tmp_path / "data", n=20)
    db = tmp_path / "_cache" / "file-hashes.sqlite"
    with HashCache(db) as first:
        expected = fingerprint_path(root, tmp_path, first)
    assert len(count_reads) == 22
    count_reads.clear()
    second = HashCache(db)
    assert fingerprint_path(root, tmp_path, second) == expected
    assert count_reads == [] and second.hits == 22
    (root / "f3.txt").write_text("changed!")
    third = HashCache(db)
    assert fingerprint_path(root, tmp_path, third) != expected
    assert count_reads == [root / "f3.txt"]


def test_memory_cache_rereads_nothing_but_a_new_one_does(
    tmp_path: Path, trusting: None, count_reads: list[Path]
) -> None:
    root = make_tree(tmp_path / "data")
    cache = HashCache(None)
    fingerprint_path(root, tmp_path, cache)
    fingerprint_path(root, tmp_path, cache)
    assert len(count_reads) == 5
    fingerprint_path(root, tmp_path, HashCache(None))
    assert len(count_reads) == 10


def test_fresh_files_are_not_remembered(tmp_path: Path, count_reads: list[Path]) -> None:
    path = tmp_path / "fresh.txt"
    path.write_text("new")
    cache = HashCache(tmp_path / "db.sqlite")
    fingerprint_path(path, tmp_path, cache)
    fingerprint_path(path, tmp_path, cache)
    assert len(count_reads) == 2


def test_unusable_cache_file_falls_back_to_memory(tmp_path: Path, trusting: None) -> None:
    bad = tmp_path / "not-a-db.sqlite"
    bad.write_text("this is not sqlite " * 100)
    (tmp_path / "x.txt").write_text("x")
    cache = HashCache(bad)
    got = fingerprint_path(tmp_path / "x.txt", tmp_path, cache)
    assert got == fingerprint_path(tmp_path / "x.txt", tmp_path)
    assert fingerprint_path(tmp_path / "x.txt", tmp_path, cache) == got and cache.hits == 1


def test_cache_pickles_as_its_path(tmp_path: Path) -> None:
    import pickle

    cache = HashCache(tmp_path / "db.sqlite")
    (tmp_path / "x.txt").write_text("x")
    cache.sha256(tmp_path / "x.txt")
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.path == cache.path and clone.sha256(tmp_path / "x.txt") == cache.sha256(tmp_path / "x.txt")


WORKER = """
import sys
from pathlib import Path
from vlmflow import fingerprint
fingerprint.RACY_NS = 0
root, db, expected = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for _ in range(15):
    cache = fingerprint.HashCache(db)
    got = fingerprint.fingerprint_path(root, root.parent, cache)
    assert fingerprint.canonical_json(got) == expected, got
    for name, _ in got["files"][:20]:  # single writes too, outside a batch
        cache.sha256(root / name)
    cache.close()
"""


def test_two_processes_share_one_cache_file(tmp_path: Path, trusting: None) -> None:
    root = make_tree(tmp_path / "data", n=300)
    db = tmp_path / "_cache" / "file-hashes.sqlite"
    expected = fingerprint.canonical_json(fingerprint_path(root, tmp_path, HashCache()))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(db), expected],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "unusable" not in out, out
    later = HashCache(db)
    assert fingerprint.canonical_json(fingerprint_path(root, tmp_path, later)) == expected
    assert later.hashed == 0 and later.hits == 302


# ------------------------------------------------------------------------------ code digests


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny package `fpdemo` on sys.path (never imported): a -> b (inside a function) -> util, consts; c alone."""
    root = tmp_path / "src"
    package = root / "fpdemo"
    (package / "inner").mkdir(parents=True)
    files = {
        "__init__.py": '"""The demo package."""\n',
        "a.py": """
            \"\"\"Module a.\"\"\"
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from fpdemo import c


            def run():
                from fpdemo import b

                return b.value()
            """,
        "b.py": """
            from . import consts
            from .util import scale


            def value():
                return scale(consts.K)
            """,
        "util.py": "def scale(x):\n    return 2 * x\n",
        "consts.py": "K = 21\n",
        "c.py": "import fpdemo.util\n\nUNRELATED = 1\n",
        "inner/__init__.py": "",
        "inner/deep.py": "from ..a import run\nfrom .. import consts\n",
    }
    for name, text in files.items():
        (package / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    clear_code_cache()
    yield package
    clear_code_cache()


def edit(path: Path, text: str) -> None:
    path.write_text(text)
    clear_code_cache()


def test_closure_follows_imports_inside_functions_and_relative_ones(pkg: Path) -> None:
    assert code_closure(["fpdemo.a"]) == ["fpdemo", "fpdemo.a", "fpdemo.b", "fpdemo.consts", "fpdemo.util"]
    assert code_closure(["fpdemo.inner.deep"]) == [
        "fpdemo",
        "fpdemo.a",
        "fpdemo.b",
        "fpdemo.consts",
        "fpdemo.inner",
        "fpdemo.inner.deep",
        "fpdemo.util",
    ]
    assert code_closure(["fpdemo.a"], exclude=["fpdemo.util"]) == ["fpdemo", "fpdemo.a", "fpdemo.b", "fpdemo.consts"]
    # exclusion is by dotted prefix, not by string prefix
    assert "fpdemo.consts" in code_closure(["fpdemo.a"], exclude=["fpdemo.con"])
    assert set(code_manifest(["fpdemo.a"])) == set(code_closure(["fpdemo.a"]))
    assert "fpdemo" not in sys.modules  # located, never imported


def test_digest_follows_code_not_formatting(pkg: Path) -> None:
    base = code_digest(["fpdemo.a"])
    assert len(base) == 64 and code_digest(("fpdemo.a",)) == base
    assert code_digest("fpdemo.a") == base

    b = (pkg / "b.py").read_text()
    edit(pkg / "b.py", '"""b: a docstring now."""\n\n# a comment\n\n\n' + b.replace("return", "return  (") + ")\n")
    assert code_digest(["fpdemo.a"]) == base, "docstring, comment, blank lines and parentheses are not code"

    a = (pkg / "a.py").read_text()
    edit(pkg / "a.py", a.replace("def run():", 'def run():  # why\n    """Run it."""\n'))
    assert code_digest(["fpdemo.a"]) == base

    edit(pkg / "c.py", "UNRELATED = 2\n")
    assert code_digest(["fpdemo.a"]) == base, "c is not imported by a (only under TYPE_CHECKING)"

    edit(pkg / "util.py", "def scale(x):\n    return 3 * x\n")
    changed = code_digest(["fpdemo.a"])
    assert changed != base, "a code change two imports away"
    assert code_digest(["fpdemo.a"]) == changed  # cached


def test_digest_is_cached_until_cleared(pkg: Path) -> None:
    base = code_digest(["fpdemo.a"])
    (pkg / "consts.py").write_text("K = 22\n")
    assert code_digest(["fpdemo.a"]) == base  # per process, as documented
    clear_code_cache()
    assert code_digest(["fpdemo.a"]) != base


def test_a_remembered_parse_gives_the_same_digest_and_an_edit_is_parsed_again(
    pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`remembering_code`: a new process (here: the per-process caches cleared) reads the parse of
    unchanged modules from the sqlite file instead of parsing them; an edited module is parsed."""
    import ast

    plain = code_digest(["fpdemo.a"])
    clear_code_cache()
    with HashCache(tmp_path / "hashes.sqlite") as cache, remembering_code(cache):
        assert code_digest(["fpdemo.a"]) == plain
    clear_code_cache()
    parsed: list[str] = []
    real_parse = ast.parse
    monkeypatch.setattr(ast, "parse", lambda source, filename="<unknown>", **kw: (
        parsed.append(filename), real_parse(source, filename, **kw))[1])  # fmt: skip
    with HashCache(tmp_path / "hashes.sqlite") as cache, remembering_code(cache):
        assert code_digest(["fpdemo.a"]) == plain
        assert parsed == [], "every module of the closure was remembered"
    edit(pkg / "util.py", "def scale(x):\n    return 3 * x\n")
    with HashCache(tmp_path / "hashes.sqlite") as cache, remembering_code(cache):
        changed = code_digest(["fpdemo.a"])
    assert [Path(name).name for name in parsed] == ["util.py"]
    clear_code_cache()
    assert changed != plain and code_digest(["fpdemo.a"]) == changed  # what parsing it gives


def test_from_import_of_a_submodule_and_missing_modules(pkg: Path) -> None:
    edit(pkg / "a.py", "from fpdemo import consts, nothing_here\nfrom fpdemo.util import scale\nimport fpdemo.ghost\n")
    closure = code_closure(["fpdemo.a"])
    assert closure == ["fpdemo", "fpdemo.a", "fpdemo.consts", "fpdemo.ghost", "fpdemo.util"]
    assert code_manifest(["fpdemo.a"])["fpdemo.ghost"] == "missing"
    before = code_digest(["fpdemo.a"])
    edit(pkg / "ghost.py", "X = 1\n")
    assert code_digest(["fpdemo.a"]) != before  # a module that appears changes the digest
    with pytest.raises(ModuleNotFoundError):
        code_closure(["fpdemo.not_a_module"])


def test_plugin_package_counts_itself_and_vlmflow_roots(pkg: Path) -> None:
    edit(pkg / "a.py", "import numpy\nfrom vlmflow.components import report\nfrom vlmflow.stage import Stage\n")
    closure = code_closure(["fpdemo.a"])
    assert "fpdemo.a" in closure and "vlmflow.components.report" in closure
    assert "numpy" not in closure and "vlmflow.stage" not in closure
    assert not any(m.startswith("numpy") for m in code_closure(["fpdemo.a"], roots=()))
    assert "vlmflow.components.report" not in code_closure(["fpdemo.a"], roots=())


def test_closure_of_a_builtin_component() -> None:
    clear_code_cache()
    closure = code_closure(["vlmflow.components.dedup"])
    assert "vlmflow.components.dedup" in closure
    assert "vlmflow.components.report" in closure  # from vlmflow.components import report
    assert not any(m == p or m.startswith(p + ".") for m in closure for p in PLUMBING)
    assert not any(m.startswith("vlmflow.runtime") for m in closure)
    assert all(m == "vlmflow" or m.startswith("vlmflow.") for m in closure)
    assert len(code_digest(["vlmflow.components.dedup"])) == 64
