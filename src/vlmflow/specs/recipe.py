"""The `Recipe` model: the single source of truth for a vlmflow run."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from vlmflow.specs.base import ExistingPath, SpecPath, StrictModel
from vlmflow.specs.data import NAME_PATTERN, DataSpec

DEFAULT_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"]


class BpeTokenizer(StrictModel):
    """Train a byte-level BPE tokenizer (HF `tokenizers`) on the dataset's text."""

    kind: Literal["bpe"]
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    special_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))


class PretrainedTokenizer(StrictModel):
    """Load a tokenizer from a local folder or tokenizer.json; missing special tokens are added."""

    kind: Literal["pretrained"]
    path: ExistingPath
    special_tokens: list[str] = Field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))


Tokenizer = Annotated[BpeTokenizer | PretrainedTokenizer, Field(discriminator="kind")]


class RaySpec(StrictModel):
    address: str | None = Field(None, description="join this cluster; default: $RAY_ADDRESS or a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; default: all")
    include_dashboard: bool = False


class MlflowSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite in the workdir")
    experiment: str | None = Field(None, description="default: the recipe name")


class RuntimeSpec(StrictModel):
    workdir: SpecPath | None = Field(None, description="default: --workdir or ./vlmflow-work")
    ray: RaySpec = Field(default_factory=RaySpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    allow_outside_paths: bool = Field(False, description="allow paths outside the spec's folder")
    progress: Literal["auto", "bar", "log"] = "auto"


class Recipe(StrictModel):
    """A VLM recipe. Later sections (capfilt, instruct, model, stages, evaluate, schedule)
    join this model as discriminated unions over their registries."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    seed: int = 0
    data: DataSpec
    tokenizer: Tokenizer | None = None
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
