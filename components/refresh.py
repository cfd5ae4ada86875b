"""Incremental ingest for the `data-refresh` flow: units content-addressed by what they read.

A refresh lists the sources again. For a source whose reader offers `items` (image-folder), every
listed row keeps the unit it had in the previous manifest version; new rows go to new units
appended after them (`shard_size` rows each); a unit that lost or changed rows is rebuilt with
the rows it still has; a unit whose rows are all gone disappears, and so do its rows. Other
sources keep `plan`'s units, and a unit is reused while its payload and the content of its
source's files are unchanged.

A unit's digest = hash(source spec, filters, seed, the ingest and refresh code, its rows and the
content of every file they read). Its shard, manifest and quarantine rows are built once, in
DIR/artifacts/ingest-units/UNIT/, and every manifest version holding that unit references them
there (no copies). A version's digest is the hash of its units: a refresh that finds nothing new
has the same digest as the last one, so every downstream stage is cached.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from vlmflow.artifacts import ArtifactStore, digest_of, file_lock
from vlmflow.component import Component, digest_view
from vlmflow.components import ingest, report
from vlmflow.components.sources.base import SOURCES, SourceContext, Unit
from vlmflow.fingerprint import HashCache, code_digest, fingerprint_path, fingerprint_value
from vlmflow.pipeline import Step
from vlmflow.plan import Plan
from vlmflow.samples import SHARDS_SCHEMA, write_tables
from vlmflow.specs.base import StrictModel
from vlmflow.specs.data import IngestSpec, source_name
from vlmflow.specs.recipe import Recipe
from vlmflow.stage import StageContext, StageResult

UNITS = "ingest-units"  # the store's folder of content-addressed units
UNIT_FILES = ("manifest.parquet", "quarantine.parquet", "shard.json")  # what a built unit holds, per source
UNITS_SCHEMA = {"source": pl.String, "unit": pl.String, "rows": pl.Int64, "keys": pl.List(pl.String)}


def assign(keys: list[str], previous: list[list[str]], shard_size: int) -> list[list[int]]:
    """Rows (indices into `keys`, in listing order) per unit: the previous units' rows that are
    still listed, in the previous units' order (a unit left empty is dropped), then the new rows
    in units of `shard_size`."""
    position = {key: i for i, key in enumerate(keys)}
    groups, placed = [], set()
    for unit in previous:
        kept = sorted(position[k] for k in unit if k in position and position[k] not in placed)
        placed.update(kept)
        if kept:
            groups.append(kept)
    new = [i for i in range(len(keys)) if i not in placed]
    return groups + [new[i : i + shard_size] for i in range(0, len(new), shard_size)]


class RefreshSpec(StrictModel):
    """An incremental ingest's cache key: its units (each content-addressed by what it reads)."""

    units: int
    units_digest: str


@dataclass(frozen=True)
class PlannedUnit:
    source: str
    digest: str
    work: tuple  # (source spec, SourceContext, Unit): what ingest.process_unit reads
    keys: list[str] = field(default_factory=list)  # the source's row keys in it ([]: not item-level)


def plan_units(
    config: IngestSpec, seed: int, previous: dict[str, list[list[str]]], base_dir: Path | None, hashes: HashCache
) -> list[PlannedUnit]:
    """The units of this refresh, given the previous version's units (source -> row keys per unit).
    A unit's digest: the code, seed, filters, its source's config and the content of the files it reads."""
    units = []
    code = code_digest([ingest.__name__, __name__])
    for index, spec in enumerate(config.sources):
        ctx = SourceContext(source_name(spec, index), seed, config.shard_size)
        reader = SOURCES.get(spec.kind)
        # the source's config as written (paths as names): what its rows read is hashed per unit below
        base = {
            "code": code,
            "seed": seed,
            "filters": digest_view(config.filters),
            "source": spec.model_dump(mode="json"),
        }
        if reader.items is None or reader.item_files is None:
            files = fingerprint_value({k: v for k, v in spec if isinstance(v, Path)}, base_dir, hashes)
            for unit in reader.plan(spec, ctx):
                digest = digest_of({**base, "files": files, "payload": unit.payload})
                units.append(PlannedUnit(ctx.name, digest, (spec, ctx, unit)))
            continue
        items = reader.items(spec, ctx)
        groups = assign([item[1] for item in items], previous.get(ctx.name, []), ctx.shard_size)
        for i, group in enumerate(groups):
            payload = [items[j] for j in group]
            states = [
                [list(item), [fingerprint_path(f, base_dir, hashes) for f in reader.item_files(spec, item)]]
                for item in payload
            ]
            digest = digest_of({**base, "items": states})
            unit = Unit(ctx.name, i, payload, len(payload))
            units.append(PlannedUnit(ctx.name, digest, (spec, ctx, unit), [item[1] for item in payload]))
    return units


def previous_units(version_dir: Path | None) -> dict[str, list[list[str]]]:
    """source -> row keys per unit, from a manifest version's units.parquet ({} without one)."""
    if version_dir is None or not (version_dir / "units.parquet").is_file():
        return {}
    found: dict[str, list[list[str]]] = {}
    for source, keys in pl.read_parquet(version_dir / "units.parquet", columns=["source", "keys"]).iter_rows():
        found.setdefault(source, []).append(keys)
    return found


def build_unit(job: tuple, filters: list, store_root: str) -> int:
    """Ingest one unit into ingest-units/UNIT/ (atomic: built in UNIT.partial, then renamed).
    Returns the rows it read, 0 when another run built it first."""
    work, digest = job
    store = ArtifactStore(Path(store_root))
    with file_lock(store.root / UNITS / f"{digest}.lock"):  # two refreshes build a new unit once
        if store.is_complete(UNITS, digest):
            return 0
        out = store.partial(UNITS, digest)
        result = ingest.process_unit(work, filters, str(out), f"{UNITS}/{digest}/shards", name=work[1].name)
        store.commit(UNITS, digest, result)
    return result["rows"]


def _unit_file(store: ArtifactStore, unit: PlannedUnit, suffix: str) -> Path:
    """One of a built unit's files: its manifest, quarantine or shard description."""
    return store.path(UNITS, unit.digest) / "units" / f"{unit.source}.{suffix}"


def _rows(path: Path) -> int:
    return pl.scan_parquet(path).select(pl.len()).collect().item()


@dataclass
class Refresh:
    """One refresh of a recipe's data: its units and the manifest version it follows."""

    recipe: Recipe
    config: IngestSpec
    store: ArtifactStore
    units: list[PlannedUnit]
    previous: str | None  # the previous manifest version's digest
    previous_dir: Path | None
    built: dict = field(default_factory=dict)  # units built and rows read, when this refresh built the version

    @classmethod
    def plan(cls, recipe: Recipe, ingest_step: Step, store: ArtifactStore, previous: str | None) -> Refresh:
        """The refresh of `ingest_step` (the recipe's ingest) after manifest version `previous`."""
        name, config = ingest_step.name, ingest_step.config
        found = store.path(name, previous) if previous and store.is_complete(name, previous) else None
        hashes = HashCache(store.root / "_cache" / "file-hashes.sqlite")
        units = plan_units(config, recipe.seed, previous_units(found), recipe.spec_dir(), hashes)
        return cls(recipe, config, store, units, previous if found else None, found)

    def plan_summary(self) -> Plan:
        """What this refresh will do, before it runs (saved as the run's plan.json)."""
        todo = [u for u in self.units if not self.store.is_complete(UNITS, u.digest)]
        return Plan.empty(
            self.recipe,
            self.store.root.parent,
            flow="data-refresh",
            previous_manifest=self.previous,
            units=len(self.units),
            units_to_build=len(todo),
            rows_to_read=sum(u.work[2].rows for u in todo),
        )

    def step(self, ingest_step: Step) -> Step:
        """The recipe's ingest step, built incrementally: same name (its readers are unchanged); the
        cache key is the digest of its units."""
        config = RefreshSpec(units=len(self.units), units_digest=digest_of([u.digest for u in self.units]))
        component = Component(
            name="ingest-refresh", config=RefreshSpec, writes="samples", run=self.run, code=(__name__,)
        )
        return Step(ingest_step.name, component, config, {}, ingest_step.field)

    def run(self, ctx: StageContext) -> StageResult:
        started, store = time.monotonic(), ctx.store
        todo = [u for u in self.units if not store.is_complete(UNITS, u.digest)]
        jobs = [(u.work, u.digest) for u in todo]
        args = (list(self.config.filters), str(store.root))
        read = ctx.executor.map_units(build_unit, jobs, desc="ingest: new units", args=args, progress=ctx.progress)
        manifests, quarantines, shard_files = ([_unit_file(store, u, f) for u in self.units] for f in UNIT_FILES)
        merged, quarantine = ingest.merge_units(manifests, quarantines, ctx.out / "manifest.parquet")
        manifest = merged.collect()
        shards = pl.DataFrame([json.loads(f.read_text()) for f in shard_files], schema=SHARDS_SCHEMA, orient="row")
        shards = shards.filter(pl.col("samples") > 0)
        rows = [_rows(m) + _rows(q) for m, q in zip(manifests, quarantines, strict=True)]
        units = pl.DataFrame(
            [[u.source, u.digest, n, u.keys] for u, n in zip(self.units, rows, strict=True)],
            schema=UNITS_SCHEMA,
            orient="row",
        )
        write_tables(ctx.out, None, quarantine, shards)  # the manifest is written by merge_units
        units.write_parquet(ctx.out / "units.parquet", statistics=False)
        report.write_quarantine_summary(quarantine, ctx.out / "quarantine_summary.json")
        report.write_sample_grid(manifest, lambda rel: store.root / rel, ctx.out / "sample_grid.png")
        self.built = {"units_built": sum(n > 0 for n in read), "rows_ingested": sum(read)}  # 0: built by another run
        metrics = {
            **self.outcome(manifest),
            "shards": shards.height,
            "images_per_s": sum(read) / max(time.monotonic() - started, 1e-9),
        }
        return StageResult(
            rows_in=manifest.height + quarantine.height,
            rows_out=manifest.height,
            rows_quarantined=quarantine.height,
            metrics=metrics,
            artifacts=["quarantine.parquet", "quarantine_summary.json", "sample_grid.png", "shards.parquet"],
            details={"previous_manifest": self.previous},
        )

    def outcome(self, manifest: pl.DataFrame) -> dict[str, int]:
        """What this refresh did: units built (0 when the version was cached) and reused, rows read,
        and manifest rows added, removed and moved (their shard changed) since the previous version."""
        built = self.built.get("units_built", 0)
        units = {"units": len(self.units), "units_built": built, "units_reused": len(self.units) - built}
        return {**units, "rows_ingested": self.built.get("rows_ingested", 0), **self.changes(manifest)}

    def changes(self, manifest: pl.DataFrame) -> dict[str, int]:
        if self.previous_dir is None:
            return {"rows_added": manifest.height, "rows_removed": 0, "rows_moved": 0}
        old = pl.read_parquet(self.previous_dir / "manifest.parquet", columns=["key", "shard"])
        both = manifest.select("key", "shard").join(old, on="key", how="full", suffix="_old", coalesce=True)
        return {
            "rows_added": both.filter(pl.col("shard_old").is_null()).height,
            "rows_removed": both.filter(pl.col("shard").is_null()).height,
            "rows_moved": both.filter(pl.col("shard") != pl.col("shard_old")).height,
        }
