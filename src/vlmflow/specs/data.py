"""The `data:` section: sources (keyed by `kind:`), filters and dedup."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from vlmflow.component import operational
from vlmflow.specs.base import ExistingDir, ExistingFile, ExistingPath, StrictModel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class SourceBase(StrictModel):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="unique name; default: the kind")
    split: str = Field("train", pattern=NAME_PATTERN)
    limit: int | None = Field(None, ge=1, description="read at most this many rows")


class SyntheticShapesSource(SourceBase):
    """Procedural scenes with a scene graph, captions (some corrupted), boxes, VQA and labels."""

    kind: Literal["synthetic-shapes"]
    count: int = Field(1000, ge=1)
    image_size: int = Field(64, ge=16, le=1024)
    min_objects: int = Field(1, ge=1, le=12)
    max_objects: int = Field(4, ge=1, le=12)
    caption_noise: float = Field(0.0, ge=0.0, le=1.0, description="fraction of corrupted captions")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int | None = Field(None, description="default: the recipe's seed")

    @model_validator(mode="after")
    def _check(self) -> SyntheticShapesSource:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class ImageFolderSource(SourceBase):
    """Images under a folder; captions from sidecar .txt files or a captions.csv/.jsonl."""

    kind: Literal["image-folder"]
    path: ExistingDir
    captions_file: ExistingFile | None = Field(
        None, description="csv (columns file,caption) or jsonl ({file, caption|captions}); default: sidecar .txt"
    )
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"]
    label_from_parent: bool = Field(False, description="use the parent folder name as the class label")


class CocoSource(SourceBase):
    """COCO captions JSON (+ optional instances JSON for boxes) and its image folder."""

    kind: Literal["coco"]
    captions: ExistingFile
    images: ExistingDir
    instances: ExistingFile | None = None


class LlavaJsonSource(SourceBase):
    """LLaVA conversation JSON (a list of {id, image, conversations}) and its image folder."""

    kind: Literal["llava-json"]
    path: ExistingFile
    images: ExistingDir


class ParquetSource(SourceBase):
    """Parquet file(s) with image bytes (or HF-style {bytes, path} structs, or paths) and text."""

    kind: Literal["parquet"]
    path: ExistingPath
    image_column: str = "image"
    caption_column: str | None = "caption"
    key_column: str | None = None
    label_column: str | None = None
    image_root: ExistingDir | None = Field(None, description="folder for relative image paths")


class WebDatasetSource(SourceBase):
    """Existing WebDataset shards (a .tar file or a folder of them)."""

    kind: Literal["webdataset"]
    path: ExistingPath
    caption_key: str = Field("txt", description="extension holding the caption, or json with 'caption(s)'")


Source = Annotated[
    SyntheticShapesSource | ImageFolderSource | CocoSource | LlavaJsonSource | ParquetSource | WebDatasetSource,
    Field(discriminator="kind"),
]


class MinSizeFilter(StrictModel):
    kind: Literal["min-size"]
    width: int = Field(8, ge=1)
    height: int = Field(8, ge=1)


class CaptionLengthFilter(StrictModel):
    kind: Literal["caption-length"]
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(2000, ge=1)


class AspectRatioFilter(StrictModel):
    kind: Literal["aspect-ratio"]
    max_ratio: float = Field(6.0, ge=1.0)


Filter = Annotated[MinSizeFilter | CaptionLengthFilter | AspectRatioFilter, Field(discriminator="kind")]


def _default_filters() -> list:
    return [MinSizeFilter(kind="min-size"), CaptionLengthFilter(kind="caption-length")]


class DedupSpec(StrictModel):
    exact: bool = Field(True, description="drop images whose decoded pixels are identical")
    near: bool = Field(True, description="drop images whose perceptual hash is within hamming_threshold")
    hamming_threshold: int = Field(4, ge=0, le=16)
    max_color_difference: float = Field(
        6.0, ge=0.0, le=255.0, description="near duplicates also differ by at most this mean |RGB| on 8x8 thumbnails"
    )
    partitions: int = operational(4, ge=1, le=4096, description="dask partitions for the join (same output)")


class IngestSpec(StrictModel):
    """The `ingest` component's config: sources read, checked and filtered into shards."""

    sources: list[Source] = Field(min_length=1)
    filters: list[Filter] = Field(default_factory=_default_filters)
    shard_size: int = Field(1000, ge=1, description="samples per WebDataset shard")

    def source_names(self) -> list[str]:
        """Every source's name, in order (source_name: the kind where none is given)."""
        return [source_name(source, index) for index, source in enumerate(self.sources)]

    @model_validator(mode="after")
    def _unique_names(self) -> IngestSpec:
        seen: set[str] = set()
        for index, source in enumerate(self.sources):
            name = source_name(source, index)
            if name in seen:
                raise ValueError(f"two sources are named {name!r}; give each a unique name")
            seen.add(name)
        return self


class DataSpec(IngestSpec):
    """The concise form's data section: ingest, then dedup unless it is null."""

    dedup: DedupSpec | None = Field(default_factory=DedupSpec)

    def ingest(self) -> IngestSpec:
        return IngestSpec(sources=list(self.sources), filters=list(self.filters), shard_size=self.shard_size)


def source_name(source: SourceBase, index: int) -> str:
    """The source's name, or `KIND` (first of its kind) / `KIND-INDEX`."""
    if source.name:
        return source.name
    kind = getattr(source, "kind", "source")
    return re.sub(r"[^A-Za-z0-9_-]", "-", kind) if index == 0 else f"{kind}-{index}"
