"""The `data:` section: sources (keyed by `kind:`), filters and dedup."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, ValidatorFunctionWrapHandler, WrapValidator, model_validator

from vlmflow.component import operational
from vlmflow.remote import CREDENTIALS_HELP, URL, looks_like_url
from vlmflow.specs import base
from vlmflow.specs.base import ExistingDir, ExistingFile, ExistingPath, Float, Int, Seed, StrictModel

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class SourceBase(StrictModel):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="unique name; default: the kind")
    split: str = Field(
        "train",
        pattern=NAME_PATTERN,
        description="the split its rows belong to: train, or val / test to hold them out for evaluation",
    )
    limit: Int | None = Field(None, ge=1, description="read at most this many rows")


def allow_outside_paths_field() -> Any:  # a pydantic FieldInfo
    return Field(
        False,
        description="read image paths (annotations, symlinks) that resolve outside the dataset's folder; "
        "default: such rows are quarantined as path-outside-dataset",
    )


DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20


def max_image_bytes_field() -> Any:  # a pydantic FieldInfo
    return Field(
        DEFAULT_MAX_IMAGE_BYTES,
        ge=1,
        description="largest image file read from local disk, in bytes; a bigger one is quarantined as "
        "too-large (its size is checked before reading, and the read stops past the limit)",
    )


def _path_or_url(*checks: Callable[[Path], Path]) -> WrapValidator:
    """A `scheme://...` string is a URL (its form checked, no network); anything else a path,
    resolved against the spec's folder, that passes CHECKS (exists, is a file / a folder)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        if isinstance(value, URL):
            return value
        if isinstance(value, str) and looks_like_url(value):
            return URL.parse(value)
        if not isinstance(value, str | PurePath):
            raise ValueError(f"expected a path or an fsspec URL, got {type(value).__name__}")
        path = base._resolve(Path(value), info)
        for check in checks:
            path = check(path)
        return path

    return WrapValidator(validate)


# An input that is a local path (relative to the spec's folder, existing) or an fsspec URL.
ExistingPathOrUrl = Annotated[ExistingPath | URL, _path_or_url(base._must_exist)]
ExistingFileOrUrl = Annotated[ExistingFile | URL, _path_or_url(base._must_exist, base._must_be_file)]
ExistingDirOrUrl = Annotated[ExistingDir | URL, _path_or_url(base._must_exist, base._must_be_dir)]

SECRET_OPTIONS = frozenset(
    {"key", "secret", "token", "password", "session_token", "access_key", "secret_key", "credentials"}
    | {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "client_kwargs", "config_kwargs"}
)


class StorageOptions(StrictModel):
    """How an `s3://` input is reached (non-secret settings only; credentials come from the environment)."""

    endpoint_url: str | None = Field(
        None,
        pattern=r"^https?://[^@/?#\s]+(/[^@?#\s]*)?$",
        description="an S3-compatible store's endpoint "
        "(MinIO...); default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS",
    )
    region: str | None = Field(None, pattern=r"^[a-z0-9-]+$", description="the bucket's region; default: AWS_REGION")
    profile: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.+=@-]+$", description="a profile of ~/.aws/credentials; default: AWS_PROFILE"
    )
    anon: bool = Field(False, description="read a public bucket without credentials")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            secrets = sorted(str(k) for k in data if str(k).lower() in SECRET_OPTIONS)
            if secrets:
                raise ValueError(f"{', '.join(secrets)}: {CREDENTIALS_HELP}")
        return data

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        """The s3fs keyword arguments these settings make."""
        if protocol not in ("s3", "s3a"):
            raise ValueError(
                f"storage_options apply to s3:// URLs; {protocol}:// reads its settings from its environment"
            )
        options: dict[str, Any] = {"anon": self.anon} if self.anon else {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        if self.profile:
            options["profile"] = self.profile
        return options


def storage_options_field() -> Any:  # a pydantic FieldInfo
    return operational(
        None,
        description="for s3:// URLs: endpoint_url, region, profile, anon (never credentials: those come from "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile); what is read is in the cache key by its ETags",
    )


class RemoteInputs(SourceBase):
    """A source whose inputs may be fsspec URLs: its `storage_options` reach them."""

    storage_options: StorageOptions | None = storage_options_field()

    @model_validator(mode="after")
    def _bind_urls(self) -> RemoteInputs:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, URL):
                options = self.storage_options.fsspec_options(value.protocol) if self.storage_options else {}
                object.__setattr__(self, name, value.with_options(options))
        return self


class SyntheticShapesSource(SourceBase):
    """Procedural scenes with a scene graph, captions (some corrupted), boxes, VQA and labels."""

    kind: Literal["synthetic-shapes"]
    count: Int = Field(1000, ge=1, description="scenes generated")
    image_size: Int = Field(64, ge=16, le=1024, description="pixels per side")
    min_objects: Int = Field(1, ge=1, le=12, description="fewest objects in a scene")
    max_objects: Int = Field(4, ge=1, le=12, description="most objects in a scene")
    caption_noise: Float = Field(0.0, ge=0.0, le=1.0, description="fraction of corrupted captions")
    val_fraction: Float = Field(0.0, ge=0.0, lt=1.0, description="share of the scenes in the val split")
    test_fraction: Float = Field(0.0, ge=0.0, lt=1.0, description="share of the scenes in the test split")
    label: Literal["shape", "color"] = Field("shape", description="a scene's class label: its largest object's")
    seed: Seed | None = Field(None, description="default: the recipe's seed")

    @model_validator(mode="after")
    def _check(self) -> SyntheticShapesSource:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class ImageFolderSource(SourceBase):
    """Images under a folder (recursively); captions from a captions file, a Hugging Face imagefolder
    metadata.jsonl / metadata.csv, or sidecar .txt files."""

    kind: Literal["image-folder"]
    path: ExistingDir = Field(description="the image folder; every file with one of `extensions` under it is a row")
    captions_file: ExistingFile | None = Field(
        None,
        description="a .csv with a header or a .jsonl of objects: a `file` (or `file_name`) column relative to "
        "`path`, and a `caption` (jsonl: or a `captions` list) or `text` column; one row per caption. Default: "
        "`path`/metadata.jsonl or metadata.csv (Hugging Face imagefolder) when present, else each image's "
        "sidecar .txt (one caption per line)",
    )
    extensions: list[str] = Field(
        [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"],
        description="the file suffixes read as images (case-insensitive)",
    )
    label_from_parent: bool = Field(False, description="use the parent folder name as the class label")
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()


class CocoSource(SourceBase):
    """COCO captions JSON (+ optional instances JSON for boxes) and its image folder."""

    kind: Literal["coco"]
    captions: ExistingFile = Field(
        description="the COCO captions JSON (images with id and file_name, annotations with image_id and caption)"
    )
    images: ExistingDir = Field(description="the folder the images' file_name values are relative to")
    instances: ExistingFile | None = Field(
        None, description="a COCO instances JSON of the same images: boxes and categories (for the instruct stage)"
    )
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()


class LlavaJsonSource(SourceBase):
    """LLaVA conversation JSON (a list of {id, image, conversations}) and its image folder."""

    kind: Literal["llava-json"]
    path: ExistingFile = Field(description="the JSON: a list of {id, image, conversations: [{from: human|gpt, value}]}")
    images: ExistingDir = Field(description="the folder the entries' image paths are relative to")
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()


class ParquetSource(RemoteInputs):
    """Parquet file(s) with image bytes (or HF-style {bytes, path} structs, or paths) and text."""

    kind: Literal["parquet"]
    path: ExistingPathOrUrl = Field(
        description="a .parquet file, or a folder read recursively for them; or an fsspec URL "
        "(s3://bucket/file.parquet, or a prefix read recursively for .parquet objects)"
    )
    image_column: str = Field(
        "image", description="the column holding each image: bytes, a {bytes, path} struct, or a path"
    )
    caption_column: str | None = Field(
        "caption", description="the column holding the caption (a string or a list of strings); null: none"
    )
    key_column: str | None = Field(None, description="the column holding each row's key (unique); default: FILE-ROW")
    label_column: str | None = Field(None, description="the column holding a class label")
    image_root: ExistingDirOrUrl | None = Field(
        None,
        description="folder (or fsspec URL prefix) of the image paths (default: the parquet file's folder); "
        "paths stay inside it",
    )
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()


# A DatasetDict split's rows go to this vlmflow split unless `split` is given.
HF_SPLITS = {"validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}


class HfDiskSource(SourceBase):
    """A Hugging Face dataset saved with `save_to_disk` (a Dataset, or one split of a DatasetDict),
    read from its Arrow files without the `datasets` package."""

    kind: Literal["hf-disk"]
    path: ExistingDir = Field(
        description="the folder `Dataset.save_to_disk` wrote (state.json, dataset_info.json, data-*.arrow) or "
        "`DatasetDict.save_to_disk` wrote (dataset_dict.json and a folder per split)"
    )
    dataset_split: str | None = Field(
        None,
        pattern=r"^\w+(\.\w+)*$",  # the split names `datasets` accepts
        description="the DatasetDict split read (required for a DatasetDict folder, an error for a Dataset "
        "folder); its rows go to `split`, which defaults to val for validation / valid / val / dev, test for "
        "test, else train",
    )
    image_column: str = Field(
        "image",
        description="the column holding each image: an Image feature ({bytes, path}), bytes, or a path; a path "
        "is relative to `path` and stays inside it",
    )
    caption_column: str | None = Field(
        "text", description="the column holding the caption (a string or a list of strings); null: none"
    )
    key_column: str | None = Field(
        None, description="the column holding each row's key (unique); default: SPLIT-ROW (row number in the split)"
    )
    label_column: str | None = Field(
        None, description="the column holding a class label (a ClassLabel's names are used where it has them)"
    )
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()

    @model_validator(mode="before")
    @classmethod
    def _split_from_dataset_split(cls, data: Any) -> Any:
        if isinstance(data, dict) and "split" not in data and isinstance(data.get("dataset_split"), str):
            return {**data, "split": HF_SPLITS.get(data["dataset_split"], "train")}
        return data

    @model_validator(mode="after")
    def _check_folder(self) -> HfDiskSource:
        if (self.path / "dataset_dict.json").is_file():
            splits = hf_splits(self.path)
            if self.dataset_split is None or self.dataset_split not in splits:
                given = "no dataset_split" if self.dataset_split is None else f"dataset_split {self.dataset_split!r}"
                raise ValueError(
                    f"{self.path} is a saved DatasetDict with splits {', '.join(splits) or '(none)'}; "
                    f"{given}: set dataset_split to one of them"
                )
        elif (self.path / "state.json").is_file():
            if self.dataset_split is not None:
                raise ValueError(
                    f"{self.path} is a saved Dataset (state.json), not a DatasetDict: it has no splits; "
                    "remove dataset_split"
                )
        else:
            raise ValueError(
                f"{self.path} is not a folder written by save_to_disk: it holds neither state.json (a Dataset) "
                "nor dataset_dict.json (a DatasetDict)"
            )
        return self


def hf_splits(folder: Path) -> list[str]:
    """The split names a saved DatasetDict's dataset_dict.json lists (a ValueError naming the file)."""
    file = folder / "dataset_dict.json"
    try:
        splits = json.loads(file.read_text(encoding="utf-8")).get("splits")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{file}: cannot read it as a DatasetDict's JSON: {exc}") from None
    if not isinstance(splits, list) or not all(isinstance(name, str) for name in splits):
        raise ValueError(f"{file}: 'splits' is not a list of split names")
    return splits


URL_LIST_USER_AGENT = "vlmflow/0.1 (url-list source; honours X-Robots-Tag noai/noimageai/noindex/noimageindex)"


class UrlResize(StrictModel):
    """How a url-list source resizes each downloaded image (img2dataset's resize modes)."""

    mode: Literal["keep-ratio", "center-crop", "border"] = Field(
        "keep-ratio",
        description="keep-ratio: the smaller side becomes `size`; center-crop: that, then the centre "
        "size x size square; border: the larger side becomes `size`, padded to a black size x size square",
    )
    size: Int = Field(ge=8, le=8192, description="pixels")


class UrlListSource(RemoteInputs):
    """A table of image URLs and captions (img2dataset's input), downloaded by the ingest tasks."""

    kind: Literal["url-list"]
    path: ExistingFileOrUrl = Field(
        description="the table: a .parquet, .csv or .jsonl file (by suffix), or an fsspec URL of one (s3://...)"
    )
    url_column: str = Field("url", min_length=1, description="the column (jsonl: key) holding each image's URL")
    caption_column: str | None = Field(
        "caption", min_length=1, description="the column holding the caption (a string or a list); null: none"
    )
    timeout_s: Float = Field(
        10.0,
        gt=0,
        le=600,
        description="seconds to connect and to wait for each read; an attempt that takes over 6 x timeout_s "
        "in all is a timeout too",
    )
    retries: Int = Field(
        2, ge=0, le=10, description="retries after a 429, a 5xx or a timeout, with exponential backoff (Retry-After)"
    )
    max_redirects: Int = Field(5, ge=0, le=50, description="redirects followed; more is redirect-loop")
    max_bytes: Int = Field(
        10 * 2**20, ge=1, le=2**31, description="largest image downloaded; a bigger one is too-large"
    )
    concurrency: Int = operational(8, ge=1, le=256, description="download threads per ingest task")
    resize: UrlResize | None = Field(None, description="resize (and re-encode) every image; null: keep the bytes")
    user_agent: str = Field(URL_LIST_USER_AGENT, pattern=r"^[\x20-\x7e]+$", description="the User-Agent header")

    @model_validator(mode="after")
    def _check(self) -> UrlListSource:
        if self.path.suffix.lower() not in (".parquet", ".csv", ".jsonl"):
            raise ValueError(f"path {self.path.name!r}: expected a .parquet, .csv or .jsonl file")
        return self


class WebDatasetSource(RemoteInputs):
    """Existing WebDataset shards (a .tar file or a folder of them, local or behind an fsspec URL)."""

    kind: Literal["webdataset"]
    path: ExistingPathOrUrl = Field(
        description="a .tar shard or a folder of them (each sample KEY.jpg|png|... beside its caption); or an "
        "fsspec URL of one, or of a prefix read recursively for .tar objects (s3://bucket/shards/)"
    )
    caption_key: str = Field("txt", description="extension holding the caption, or json with 'caption(s)'")
    max_image_bytes: Int = Field(
        64 * 2**20, ge=1, description="largest image member read; a sample with a bigger one is member-too-large"
    )
    max_text_bytes: Int = Field(
        2**20, ge=1, description="largest caption/json/cls member read; a sample with a bigger one is member-too-large"
    )


Source = Annotated[
    SyntheticShapesSource
    | ImageFolderSource
    | CocoSource
    | LlavaJsonSource
    | ParquetSource
    | HfDiskSource
    | UrlListSource
    | WebDatasetSource,
    Field(discriminator="kind"),
]


class MinSizeFilter(StrictModel):
    kind: Literal["min-size"]
    width: Int = Field(8, ge=1, description="narrowest image kept, in pixels; narrower: image-too-small")
    height: Int = Field(8, ge=1, description="lowest image kept, in pixels; lower: image-too-small")


class CaptionLengthFilter(StrictModel):
    kind: Literal["caption-length"]
    min_chars: Int = Field(1, ge=0, description="shortest caption kept (characters); shorter: caption-too-short")
    max_chars: Int = Field(2000, ge=1, description="longest caption kept (characters); longer: caption-too-long")


class AspectRatioFilter(StrictModel):
    kind: Literal["aspect-ratio"]
    max_ratio: Float = Field(
        6.0,
        ge=1.0,
        description="largest ratio of the longer side to the shorter one kept; larger: extreme-aspect-ratio",
    )


Filter = Annotated[MinSizeFilter | CaptionLengthFilter | AspectRatioFilter, Field(discriminator="kind")]


def _default_filters() -> list:
    return [MinSizeFilter(kind="min-size"), CaptionLengthFilter(kind="caption-length")]


DEFAULT_CAPTIONS = "report"
DEFAULT_CAPTION_THRESHOLD = 0.9


class DedupSpec(StrictModel):
    exact: bool = Field(True, description="drop images whose decoded pixels are identical")
    near: bool = Field(True, description="drop images whose perceptual hash is within hamming_threshold")
    hamming_threshold: Int = Field(
        4, ge=0, le=16, description="largest perceptual-hash distance (bits of 64) between near duplicates"
    )
    max_color_difference: Float = Field(
        6.0, ge=0.0, le=255.0, description="near duplicates also differ by at most this mean |RGB| on 8x8 thumbnails"
    )
    partitions: Int = operational(4, ge=1, le=4096, description="dask partitions for the join (same output)")
    captions: Literal["none", "report", "drop"] = Field(
        DEFAULT_CAPTIONS,
        description="near-duplicate captions (MinHash LSH over word 3-shingles, character 5-grams for short "
        "captions, among the rows the image dedup keeps): none: not looked for; report: their pairs go to "
        "caption_pairs.parquet, every row is kept (synthetic and COCO-style data repeat captions for different "
        "images); drop: every row of a cluster but its smallest key is quarantined as caption-duplicate-of:KEY",
        exclude_if=lambda v: v == DEFAULT_CAPTIONS,  # default: the spec dumps as before the option
    )
    caption_threshold: Float = Field(
        DEFAULT_CAPTION_THRESHOLD,
        ge=0.5,
        le=1.0,
        description="two captions are near duplicates when the Jaccard similarity of their (normalised) shingle "
        "sets is at least this; 1.0: the same normalised text only",
        exclude_if=lambda v: v == DEFAULT_CAPTION_THRESHOLD,
    )


class IngestSpec(StrictModel):
    """The `ingest` component's config: sources read, checked and filtered into shards."""

    sources: list[Source] = Field(min_length=1, description="the sources read, each with a unique name")
    filters: list[Filter] = Field(
        default_factory=_default_filters,
        description="checks every row must pass; a failing row is quarantined with its reason",
    )
    shard_size: Int = Field(1000, ge=1, description="samples per WebDataset shard")

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

    dedup: DedupSpec | None = Field(
        default_factory=DedupSpec, description="exact and near duplicate removal after ingest; null: none"
    )

    def ingest(self) -> IngestSpec:
        return IngestSpec(sources=list(self.sources), filters=list(self.filters), shard_size=self.shard_size)


def source_name(source: SourceBase, index: int) -> str:
    """The source's name, or `KIND` (first of its kind) / `KIND-INDEX`."""
    if source.name:
        return source.name
    kind = getattr(source, "kind", "source")
    return re.sub(r"[^A-Za-z0-9_-]", "-", kind) if index == 0 else f"{kind}-{index}"
