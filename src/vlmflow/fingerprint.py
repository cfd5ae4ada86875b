"""What stage cache keys are made of: content fingerprints of input files and digests of code.

Files
    `fingerprint_path` describes a file or a folder by the sha256 of its content, never by size
    or mtime. `HashCache` only spares re-reading a file seen before: it remembers each file's
    hash under (absolute path, size, mtime_ns, inode, ctime_ns) and hashes again when any of them
    moved. ctime is in the key because every write moves it, and `os.utime` cannot set it back,
    so a rewrite that restores size and mtime still misses the cache. Timestamps are coarse (a
    kernel tick, a second on some filesystems), so a file changed within `RACY_NS` of being
    hashed is hashed but not remembered (git's "racily clean" rule): a second write in the same
    tick cannot hide behind an unchanged stat.

    Paths inside `base` (the spec's folder, the workdir) are named relative to it, as posix
    strings, so a workdir copied with its spec folder to another machine keeps its digests;
    paths outside `base` are named absolutely.

    Folder walks list regular files only, recursively, sorted by relative name. They skip
    entries whose name starts with "." (hidden files and folders) and folders named
    `__pycache__`. A symlink to a file is listed under the link's name with its target's
    content hash. A symlink to a folder is not followed (no cycles, nothing outside the folder
    is read): it is listed under "links" with its link text, so retargeting it changes the
    fingerprint while changes behind it do not; dangling links are listed there too. Sockets,
    fifos and devices are skipped (never opened). The folder given itself is always walked,
    whatever its name.

Remote inputs
    An fsspec URL in a config (`vlmflow.remote.URL`, e.g. `s3://bucket/shards/`) is described
    by the objects it names, each by what its store reports of its content from one listing
    call: ETag, size, and version id where present (`vlmflow.remote.identity`). Nothing is
    downloaded for it (the ingest reads each object once), and a changed object changes the key.
    The URL itself is part of the description, as a local path's name is.

Code
    `code_digest` hashes the static import closure of some modules, parsed with `ast` and never
    imported (locating a module only asks the import system's finders; see `_find_spec`).
    Each module's source is normalised (docstrings dropped, then `ast.dump` without positions),
    so comments, blank lines, formatting and docstrings do not change the digest; code does.
    What the closure misses: imports by name at run time (`importlib.import_module`,
    entry points), imports under `if TYPE_CHECKING:` (dropped on purpose), modules outside
    `roots` (third-party libraries: their versions are the environment's business), and the
    `PLUMBING` modules. The `ast.dump` format belongs to the Python version, so a new minor
    Python may change every digest once.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel

from vlmflow.artifacts import canonical_json, digest_of, file_sha256
from vlmflow.remote import URL, list_objects

log = logging.getLogger(__name__)

# A file whose mtime or ctime is this close to the moment it was hashed is not remembered.
RACY_NS = 2_000_000_000

# Pending rows written to the sqlite cache in one transaction at most.
_FLUSH_EVERY = 2000

# vlmflow modules left out of code digests: they run stages (runtime, flows, stage, component,
# pipeline, plan, registry), validate and load specs (specs: a spec change already reaches a
# digest through the resolved config slice), keep the store and these keys (artifacts,
# fingerprint), track and report (tracking, progress, errors, cli). None of them decides what a
# stage writes, and each is imported by nearly every component, so counting them would make
# every edit to the machinery invalidate every cached artifact.
PLUMBING: tuple[str, ...] = (
    "vlmflow.runtime",
    "vlmflow.tracking",
    "vlmflow.progress",
    "vlmflow.errors",
    "vlmflow.cli",
    "vlmflow.specs",
    "vlmflow.artifacts",
    "vlmflow.fingerprint",
    "vlmflow.flows",
    "vlmflow.stage",
    "vlmflow.component",
    "vlmflow.pipeline",
    "vlmflow.plan",
    "vlmflow.registry",
    "vlmflow.recipes",
    "vlmflow.versions",
)


# ---------------------------------------------------------------------------------------------
# File content hashes


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def _racy(st: os.stat_result, now_ns: int) -> bool:
    return now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS


class HashCache:
    """sha256 of file contents, remembered per (absolute path, size, mtime_ns, inode, ctime_ns).

    `HashCache(path)` keeps them in a sqlite file at `path` (e.g. WORKDIR/_cache/file-hashes.sqlite)
    that several processes may use at once (sqlite's own locking; writes are batched into one
    transaction per `batch()`). `HashCache(None)`, the default, remembers in memory only. The
    cache is an optimisation: if the sqlite file cannot be opened or written, it warns once and
    goes on in memory. `hashed` and `hits` count files read and files answered from the cache.
    Pickling keeps only the path (a Ray worker opens its own connection).
    """

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else None
        self.hashed = 0
        self.hits = 0
        self._memory: dict[str, tuple[str, str]] = {}
        self._pending: dict[str, tuple[str, str]] = {}
        self._modules: dict[str, str] = {}  # parsed modules (see `remembering_code`): key -> info JSON
        self._pending_modules: dict[str, str] = {}
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._broken = False
        self._depth = 0

    def __repr__(self) -> str:
        return f"HashCache({str(self.path) if self.path else None!r})"

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sqlite

    def _connection(self) -> sqlite3.Connection | None:
        if self.path is None or self._broken:
            return None
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS file_hashes"
                " (path TEXT PRIMARY KEY, stat TEXT NOT NULL, sha256 TEXT NOT NULL)"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS module_infos (key TEXT PRIMARY KEY, info TEXT NOT NULL)")
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)
            return None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _give_up(self, exc: BaseException) -> None:
        log.warning("file hash cache %s unusable (%s); hashing without it", self.path, exc)
        self._broken = True
        self._pending.clear()
        self._pending_modules.clear()

    def _lookup(self, abspath: str, key: str) -> str | None:
        remembered = self._memory.get(abspath)
        if remembered is not None and remembered[0] == key:
            return remembered[1]
        conn = self._connection()
        if conn is None:
            return None
        try:
            row = conn.execute("SELECT sha256 FROM file_hashes WHERE path = ? AND stat = ?", (abspath, key)).fetchone()
        except sqlite3.Error as exc:
            self._give_up(exc)
            return None
        if row is None:
            return None
        self._memory[abspath] = (key, row[0])
        return row[0]

    def flush(self) -> None:
        """Write the hashes remembered since the last flush to the sqlite file (one transaction)."""
        with self._lock:
            if not self._pending and not self._pending_modules:
                return
            rows = [(p, key, sha) for p, (key, sha) in self._pending.items()]
            modules = list(self._pending_modules.items())
            self._pending.clear()
            self._pending_modules.clear()
            conn = self._connection()
            if conn is None:
                return
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany("INSERT OR REPLACE INTO file_hashes (path, stat, sha256) VALUES (?, ?, ?)", rows)
                    conn.executemany("INSERT OR REPLACE INTO module_infos (key, info) VALUES (?, ?)", modules)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._give_up(exc)

    def close(self) -> None:
        """Flush and close the sqlite connection (a later use opens it again)."""
        with self._lock:
            self.flush()
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    @contextmanager
    def batch(self) -> Iterator[HashCache]:
        """Hold writes to the sqlite file until the outermost batch ends (one transaction)."""
        with self._lock:
            self._depth += 1
        try:
            yield self
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self.flush()

    # -- parsed modules

    def module_info(self, key: str) -> str | None:
        """A parsed module's info (JSON) remembered under `key`, if any."""
        with self._lock:
            if key in self._modules:
                return self._modules[key]
            conn = self._connection()
            if conn is None:
                return None
            try:
                row = conn.execute("SELECT info FROM module_infos WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as exc:
                self._give_up(exc)
                return None
            if row is not None:
                self._modules[key] = row[0]
            return row[0] if row else None

    def remember_module_info(self, key: str, info: str) -> None:
        with self._lock:
            self._modules[key] = info
            if self.path is not None and not self._broken:
                self._pending_modules[key] = info
                if self._depth == 0 or len(self._pending_modules) >= _FLUSH_EVERY:
                    self.flush()

    # -- hashing

    def sha256(self, path: Path | str) -> str:
        """The sha256 hex of a regular file's content (following symlinks), from the cache when the stat matches."""
        abspath = os.path.abspath(path)
        st = os.stat(abspath)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"not a regular file: {abspath}")
        return self._sha256(abspath, st)

    def _sha256(self, abspath: str, st: os.stat_result) -> str:
        key = _stat_key(st)
        with self._lock:
            cached = self._lookup(abspath, key)
            if cached is not None:
                self.hits += 1
                return cached
        digest = file_sha256(Path(abspath))
        after = os.stat(abspath)
        with self._lock:
            self.hashed += 1
            # Remember only a file that held still while it was read and is not racily fresh.
            if _stat_key(after) == key and not _racy(after, time.time_ns()):
                self._memory[abspath] = (key, digest)
                if self.path is not None and not self._broken:
                    self._pending[abspath] = (key, digest)
                    if self._depth == 0 or len(self._pending) >= _FLUSH_EVERY:
                        self.flush()
        return digest


# ---------------------------------------------------------------------------------------------
# Fingerprints of paths and of values holding paths


def _name(abspath: str, base: str | None) -> str:
    if base is not None:
        if abspath == base:
            return "."
        prefix = base if base.endswith(os.sep) else base + os.sep
        if abspath.startswith(prefix):
            return PurePath(abspath[len(prefix) :]).as_posix()
    return abspath


def _skipped(name: str, is_dir: bool) -> bool:
    return name.startswith(".") or (is_dir and name == "__pycache__")


def _walk(folder: str, rel: str, cache: HashCache, files: list[list[str]], links: list[list[str]]) -> None:
    with os.scandir(folder) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        name = f"{rel}{entry.name}"
        if entry.is_symlink():
            if entry.name.startswith("."):
                continue
            try:
                st = os.stat(entry.path)  # the target
            except OSError:
                links.append([name, os.readlink(entry.path)])  # dangling
                continue
            if stat.S_ISREG(st.st_mode):
                files.append([name, cache._sha256(entry.path, st)])
            elif stat.S_ISDIR(st.st_mode):
                links.append([name, os.readlink(entry.path)])
            continue
        if entry.is_dir(follow_symlinks=False):
            if not _skipped(entry.name, True):
                _walk(entry.path, name + "/", cache, files, links)
        elif entry.is_file(follow_symlinks=False) and not _skipped(entry.name, False):
            files.append([name, cache._sha256(entry.path, entry.stat(follow_symlinks=False))])


def fingerprint_path(path: Path | str, base: Path | str | None = None, cache: HashCache | None = None) -> dict:
    """A file, folder or missing path described by content hashes, named relative to `base` where inside it.

    file: {"path": REL, "sha256": HEX}; folder: {"path": REL, "files": [[name, HEX], ...]} (plus
    "links": [[name, link text], ...] when it holds symlinked folders or dangling links); missing:
    {"path": REL, "missing": True}; a socket, fifo or device: {"path": REL, "special": True}.
    """
    cache = cache if cache is not None else HashCache()
    abspath = os.path.abspath(path)
    rel = _name(abspath, os.path.abspath(base) if base is not None else None)
    try:
        st = os.stat(abspath)
    except FileNotFoundError:
        return {"path": rel, "missing": True}
    with cache.batch():
        if stat.S_ISREG(st.st_mode):
            return {"path": rel, "sha256": cache._sha256(abspath, st)}
        if stat.S_ISDIR(st.st_mode):
            files: list[list[str]] = []
            links: list[list[str]] = []
            _walk(abspath, "", cache, files, links)
            files.sort()
            result: dict[str, Any] = {"path": rel, "files": files}
            if links:
                result["links"] = sorted(links)
            return result
    return {"path": rel, "special": True}


def fingerprint_url(url: URL) -> dict:
    """{"url": URL, "objects": [[name relative to the URL, {size, etag[, version]}], ...]} (see
    "Remote inputs" above); a UserError naming the URL when it names nothing or cannot be listed."""
    return {"url": str(url), "objects": [[o.name, o.identity] for o in list_objects(url)]}


def fingerprint_value(value: Any, base: Path | str | None = None, cache: HashCache | None = None) -> Any:
    """JSON-like data with every `pathlib` path replaced by its `fingerprint_path`, every remote URL
    by its `fingerprint_url`; other strings stay strings.

    Walks dicts (values), lists, tuples, sets (sorted), pydantic models (`model_dump(mode="python")`)
    and dataclass instances; other scalars are returned as they are.
    """
    cache = cache if cache is not None else HashCache()
    with cache.batch():
        return _fingerprint_value(value, base, cache)


def _fingerprint_value(value: Any, base: Path | str | None, cache: HashCache) -> Any:
    if isinstance(value, URL):
        return fingerprint_url(value)
    if isinstance(value, PurePath):
        return fingerprint_path(Path(value), base, cache)
    if isinstance(value, BaseModel):
        return _fingerprint_value(value.model_dump(mode="python"), base, cache)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fingerprint_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, base, cache)
    if isinstance(value, dict):
        return {str(k) if isinstance(k, PurePath) else k: _fingerprint_value(v, base, cache) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_fingerprint_value(v, base, cache) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_fingerprint_value(v, base, cache) for v in value), key=canonical_json)
    return value


# ---------------------------------------------------------------------------------------------
# Code digests


@dataclasses.dataclass(frozen=True)
class _ModuleInfo:
    digest: str  # sha256 of the normalised source
    imports: tuple[str, ...]  # modules the source imports for sure
    maybe: tuple[str, ...]  # `from X import name`: X.name, if it is a module


_SPECS: dict[str, ModuleSpec | None] = {}
_INFOS: dict[str, _ModuleInfo | None] = {}
_REMEMBERING: list[HashCache] = []  # the caches of the `remembering_code` blocks now open


@contextmanager
def remembering_code(cache: HashCache) -> Iterator[HashCache]:
    """Within the block, a module's parse (its normalised digest and imports) is also looked up in
    and written to `cache`, keyed by the module's name and the sha256 of its source: a new process
    (the next `vlmflow run` or `plan`) reads the closure's sources but parses only those that
    changed. The digests are the same with or without it."""
    _REMEMBERING.append(cache)
    try:
        yield cache
    finally:
        _REMEMBERING.remove(cache)


def _find_spec(name: str) -> ModuleSpec | None:
    """The module's spec, asking `sys.meta_path` finders with the parent's search path, importing nothing.

    `importlib.util.find_spec` imports the parent packages first; this walks down from the top
    instead (the parents' specs give the search path), so finding a submodule runs no package's
    `__init__`. A module already imported answers with its own `__spec__`.
    """
    if name in _SPECS:
        return _SPECS[name]
    spec: ModuleSpec | None = None
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__spec__", None) is not None:
        spec = module.__spec__
    else:
        parent = name.rpartition(".")[0]
        search: list[str] | None = None
        ok = True
        if parent:
            parent_spec = _find_spec(parent)
            ok = parent_spec is not None and parent_spec.submodule_search_locations is not None
            if ok:  # an imported package's __path__ may have been extended at run time
                path = getattr(sys.modules.get(parent), "__path__", None)
                search = list(path if path is not None else parent_spec.submodule_search_locations)  # type: ignore[union-attr]
        if ok:
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                try:
                    spec = find(name, search, None)
                except Exception:  # a third-party finder's quirk must not break digests
                    continue
                if spec is not None:
                    break
    _SPECS[name] = spec
    return spec


def _source(name: str, spec: ModuleSpec) -> bytes | None:
    origin = spec.origin
    if origin and spec.has_location and origin.endswith(".py"):
        return Path(origin).read_bytes()
    loader = spec.loader
    get_source = getattr(loader, "get_source", None)
    if get_source is not None:
        try:
            text = get_source(name)
        except (ImportError, OSError):
            text = None
        if text is not None:
            return text.encode("utf-8")
    return None


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            first = body[0].value if body and isinstance(body[0], ast.Expr) else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                del body[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement anywhere (functions, classes, try blocks), but not under `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(tree: ast.AST, name: str, is_package: bool) -> tuple[set[str], set[str]]:
    sure: set[str] = set()
    maybe: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            sure.update(alias.name for alias in node.names)
            continue
        if node.level:
            parts = package.split(".") if package else []
            if node.level - 1 > len(parts) - 1 or not parts:
                continue  # beyond the top-level package: Python would raise; nothing to follow
            anchor = ".".join(parts[: len(parts) - (node.level - 1)])
            target = f"{anchor}.{node.module}" if node.module else anchor
        else:
            target = node.module or ""
        if not target:
            continue
        sure.add(target)
        maybe.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return sure, maybe


def _module_info(name: str) -> _ModuleInfo | None:
    """The normalised digest and imports of a module; None when no finder knows it."""
    if name in _INFOS:
        return _INFOS[name]
    spec = _find_spec(name)
    info: _ModuleInfo | None = None
    if spec is not None:
        is_package = spec.submodule_search_locations is not None
        source = _source(name, spec)
        if source is not None:
            info = _parsed(name, source, is_package, spec.origin or name)
        else:  # a namespace package has no code; an extension module is hashed by its bytes
            origin = spec.origin if spec.has_location else None
            if origin and os.path.isfile(origin):
                normal = b"binary:" + Path(origin).read_bytes()
            else:
                normal = b"namespace" if is_package else f"no-source:{spec.origin}".encode()
            info = _ModuleInfo(hashlib.sha256(normal).hexdigest(), (), ())
    _INFOS[name] = info
    return info


def _parsed(name: str, source: bytes, is_package: bool, filename: str) -> _ModuleInfo:
    """A module's info from its source: remembered by an open `remembering_code` cache, or parsed."""
    key = f"{name}:{int(is_package)}:{hashlib.sha256(source).hexdigest()}"
    caches = _REMEMBERING[-1:]
    for cache in caches:
        found = cache.module_info(key)
        if found is not None:
            digest, imports, maybe = json.loads(found)
            return _ModuleInfo(digest, tuple(imports), tuple(maybe))
    sure: set[str] = set()
    maybe_modules: set[str] = set()
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError:
        normal = b"unparsable:" + source
    else:
        sure, maybe_modules = _imports(tree, name, is_package)
        _strip_docstrings(tree)
        normal = ast.dump(tree, annotate_fields=True, include_attributes=False).encode()
    info = _ModuleInfo(hashlib.sha256(normal).hexdigest(), tuple(sorted(sure)), tuple(sorted(maybe_modules)))
    for cache in caches:
        cache.remember_module_info(key, json.dumps([info.digest, info.imports, info.maybe]))
    return info


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _key(
    module_names: Iterable[str], roots: Iterable[str], exclude: Iterable[str]
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    if isinstance(module_names, str):
        module_names = (module_names,)
    return tuple(sorted(set(module_names))), tuple(sorted(set(roots))), tuple(sorted(set(exclude)))


@functools.lru_cache(maxsize=1024)
def _manifest(names: tuple[str, ...], roots: tuple[str, ...], exclude: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    tops = set(roots) | {n.split(".")[0] for n in names}

    def wanted(module: str) -> bool:
        return module.split(".")[0] in tops and not _under(module, exclude)

    for start in names:
        if _module_info(start) is None:
            raise ModuleNotFoundError(f"no module named {start!r}", name=start)
    found: dict[str, str] = {}
    queue = list(names)
    while queue:
        module = queue.pop()
        if module in found:
            continue
        info = _module_info(module)
        # A module Python cannot find is still named: its appearing later changes the digest.
        found[module] = info.digest if info is not None else "missing"
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: they count too.
        parts = module.split(".")
        queue.extend(
            parent
            for parent in (".".join(parts[:i]) for i in range(1, len(parts)))
            if parent not in found and wanted(parent)
        )
        if info is None:
            continue
        queue.extend(m for m in info.imports if m not in found and wanted(m))
        queue.extend(m for m in info.maybe if m not in found and wanted(m) and _module_info(m) is not None)
    return tuple(sorted(found.items()))


def code_manifest(
    module_names: Iterable[str], roots: Iterable[str] = ("vlmflow",), exclude: Iterable[str] = PLUMBING
) -> dict[str, str]:
    """{module: sha256 of its normalised source} for the closure `code_digest` covers (to see what changed)."""
    return dict(_manifest(*_key(module_names, roots, exclude)))


def code_closure(
    module_names: Iterable[str], roots: Iterable[str] = ("vlmflow",), exclude: Iterable[str] = PLUMBING
) -> list[str]:
    """The sorted module names `code_digest` covers: the static import closure within `roots`, less `exclude`.

    `roots` is widened by the top-level package of each starting module (a plugin's own
    package); the starting modules are always in; `exclude` names dotted prefixes
    ("vlmflow.runtime" covers vlmflow.runtime.ray, not vlmflow.runtimes); the packages above
    each module (their `__init__` runs on import) count like imports.
    """
    return [name for name, _ in _manifest(*_key(module_names, roots, exclude))]


def code_digest(
    module_names: Iterable[str], roots: Iterable[str] = ("vlmflow",), exclude: Iterable[str] = PLUMBING
) -> str:
    """sha256 hex over the sorted (module, normalised source) pairs of `code_closure`; cached per process."""
    return digest_of([list(pair) for pair in _manifest(*_key(module_names, roots, exclude))], length=64)


def clear_code_cache() -> None:
    """Forget every code digest, located module and parsed source (after editing code in this process)."""
    _manifest.cache_clear()
    _SPECS.clear()
    _INFOS.clear()
    importlib.invalidate_caches()
