"""The `capfilt:` section: BLIP's captioning and filtering of noisy image-text pairs.

A captioner writes k synthetic captions per image; a filter (ITM head probability and/or
ITC cosine similarity) scores the web caption and the synthetic ones and keeps the pairs
above its thresholds. Both models are a training stage of the recipe, a registered MLflow
model version or a local model folder written by a training stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vlmflow.component import operational
from vlmflow.specs.base import ExistingDir, Float, Int, StrictModel

MODEL_CONFIG = "vlmflow_model.json"  # what a training stage's model/ folder holds (components/train/setup.py)


HF_BLIP = {"BlipForConditionalGeneration": "language", "BlipForImageTextRetrieval": "text"}  # -> the part it has


def hf_architecture(folder: Path) -> str | None:
    """The BLIP architecture a Hugging Face folder's config.json names (None: not such a folder)."""
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    found = [a for a in data.get("architectures") or [] if a in HF_BLIP] if isinstance(data, dict) else []
    return found[0] if found and data.get("model_type") == "blip" else None


class ModelRef(StrictModel):
    """Exactly one of: `stage` (a training stage of this recipe), `uri` (models:/NAME/VERSION),
    `path` (a model folder written by a training stage: vlmflow_model.json + model.safetensors;
    or a Hugging Face BLIP folder: BlipForConditionalGeneration captions, BlipForImageTextRetrieval
    filters)."""

    stage: str | None = None
    uri: str | None = Field(None, pattern=r"^models:/[^/]+/[0-9]+$", description="a pinned registered version")
    path: ExistingDir | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelRef:
        given = [name for name in ("stage", "uri", "path") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of stage, uri, path (got {', '.join(given) or 'none'})")
        if self.path is not None and not (self.path / MODEL_CONFIG).is_file() and not hf_architecture(self.path):
            raise ValueError(
                f"{self.path} is not a vlmflow model folder (no {MODEL_CONFIG}) nor a Hugging Face BLIP folder "
                f"(config.json with model_type blip and architectures {' or '.join(HF_BLIP)}); give the model/ "
                "folder of a training stage's artifact, a BLIP folder, or a registered version as uri: "
                "models:/NAME/VERSION"
            )
        return self

    def parts(self) -> set[str] | None:
        """The model parts of a local folder (None when the reference is not a folder): language
        (it can caption), text (a text encoder and matching head: it can filter)."""
        if self.path is None:
            return None
        if architecture := hf_architecture(self.path):
            return {HF_BLIP[architecture]}
        model = json.loads((self.path / MODEL_CONFIG).read_text()).get("model", {})
        return {part for part in ("language", "text") if model.get(part)}


class CaptionerSpec(StrictModel):
    model: ModelRef
    prompt: str | None = Field(
        None, description="default: the captioner stage's prompt, else 'Describe the image.'; for a Hugging Face "
        "BLIP folder: none (a caption prefix such as 'a picture of' when given)"
    )  # fmt: skip
    strategy: Literal["sample", "greedy", "beam"] = Field("sample", description="BLIP: nucleus sampling")
    top_p: Float = Field(0.9, gt=0, le=1)
    temperature: Float = Field(1.0, gt=0)
    num_beams: Int = Field(3, ge=1)
    k: Int = Field(1, ge=1, le=32, description="synthetic captions per image")
    max_new_tokens: Int = Field(32, ge=1, le=512)


class Calibration(StrictModel):
    """Thresholds set from held-out clean pairs instead of fixed: each threshold given (itm, itc) is
    replaced by the highest value that `keep` of them pass. A filter's P(match) on images it never
    saw is often far below 0.5 for true pairs (it was fine-tuned on few clean images, with more
    negatives than positives), so a fixed 0.5 removes many good pairs."""

    source: str = Field(description="a clean source whose held-out rows (split val) and captions are the truth")
    keep: Float = Field(0.95, gt=0, lt=1, description="the fraction of held-out clean pairs that pass each threshold")


class FilterSpec(StrictModel):
    """A pair is kept when it passes every threshold given."""

    model: ModelRef
    itm: Float | None = Field(0.5, ge=0, le=1, description="keep when P(match) from the ITM head >= itm")
    itc: Float | None = Field(None, ge=0, le=1, description="keep when the ITC cosine similarity >= itc")
    calibrate: Calibration | None = Field(
        None, description="set the thresholds given from held-out clean pairs (their values are then unused)"
    )

    @model_validator(mode="after")
    def _check(self) -> FilterSpec:
        if self.itm is None and self.itc is None:
            raise ValueError("give a threshold: itm, itc or both")
        return self


class CapfiltResources(StrictModel):
    actors: Int = operational(1, ge=1, description="Ray actors, each loading the model once")
    cpus_per_actor: Float = operational(1, gt=0)
    gpus_per_actor: Float = Field(0, ge=0)
    batch_size: Int = Field(32, ge=1, description="images per batch")


class CapfiltSpec(StrictModel):
    """Caption (optional) and filter the training rows of a data artifact; the output artifact
    `capfilt` holds every image with at least one kept caption, usable as a stage's `data:`."""

    data: str = Field("dedup", description="the data artifact to bootstrap: ingest, dedup or instruct")
    sources: list[str] | None = Field(
        None, min_length=1, description="the web sources to caption and filter (default: all); rows of other "
        "sources (clean, human-annotated data) pass unchanged"
    )  # fmt: skip
    captioner: CaptionerSpec | None = Field(None, description="none: filter the web captions only")
    filter: FilterSpec
    apply_to: list[Literal["web", "synthetic"]] = Field(
        default_factory=lambda: ["web", "synthetic"], min_length=1, description="which captions the filter judges"
    )
    resources: CapfiltResources = Field(default_factory=CapfiltResources)
    rounds: Int = Field(
        1, ge=1, le=10, description="bootstrap rounds: after round r the captioner and filter stages are trained "
        "further on round r's output (stages NAME-rR+1), then caption and filter the data again"
    )  # fmt: skip
    round_steps: Int | None = Field(
        None, ge=1, description="optimizer steps of each retraining in rounds >= 2 (default: the stage's own)"
    )
    retrain: list[Literal["captioner", "filter"]] | None = Field(
        None, min_length=1, description="the models rounds >= 2 train further (default: every one CapFilt uses); "
        "one left out keeps captioning or judging with its round-1 model. BLIP bootstraps only the next model on the "
        "filtered data: a filter retrained on its own kept pairs learns their errors as matches. Unused with rounds: 1"
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> CapfiltSpec:
        if len(set(self.apply_to)) != len(self.apply_to):
            raise ValueError("apply_to lists an origin twice")
        if "synthetic" in self.apply_to and self.captioner is None:
            raise ValueError("apply_to has synthetic, but there is no captioner to write synthetic captions")
        if self.round_steps is not None and self.rounds == 1:
            raise ValueError("round_steps is for rounds >= 2 (rounds is 1)")
        if self.rounds > 1:
            self._check_retrain()
        return self

    def _check_retrain(self) -> None:
        if self.retrain is not None and len(set(self.retrain)) != len(self.retrain):
            raise ValueError("retrain lists a model twice")
        if self.retrain is not None and "captioner" in self.retrain and self.captioner is None:
            raise ValueError("retrain has captioner, but there is no captioner")
        refs = self.model_refs()
        shared = "captioner" in refs and refs["captioner"].stage is not None and refs["captioner"] == refs["filter"]
        if shared and len(self.retrained_roles()) == 1:
            raise ValueError(
                f"the captioner and filter are the same stage {refs['filter'].stage!r}: retraining it retrains "
                "both; retrain both or use two stages"
            )
        fixed = [role for role in self.retrained_roles() if refs[role].stage is None]
        if fixed:
            raise ValueError(
                f"rounds: {self.rounds} retrains the {' and '.join(fixed)} model, but it is not a training stage of "
                "this recipe (give model: {stage: NAME}, or leave it out of retrain)"
            )

    def model_refs(self) -> dict[str, ModelRef]:
        """role (captioner, filter) -> its model reference."""
        return ({"captioner": self.captioner.model} if self.captioner else {}) | {"filter": self.filter.model}

    def retrained_roles(self) -> list[str]:
        """The roles (captioner first) whose models rounds >= 2 train further."""
        return [role for role in self.model_refs() if self.retrain is None or role in self.retrain]

    def retrained_stages(self) -> list[str]:
        """The training stages rounds >= 2 train further (captioner first), each once; none with one round."""
        if self.rounds == 1:
            return []
        refs = self.model_refs()
        return list(dict.fromkeys(refs[role].stage for role in self.retrained_roles()))

    def model_round(self, role: str, round_: int) -> int:
        """The round whose model `role` uses in round `round_`: its own when retrained, else round 1."""
        return round_ if role in self.retrained_roles() else 1


class CaptionStepSpec(StrictModel):
    """The `capfilt-caption` component's config: the captioner writes `captioner.k` captions per
    image of the scope (the training rows of `sources`). Its model comes through the `captioner`
    input (a training step) or from `captioner.model` (path: or uri:)."""

    data: str = operational("dedup", description="what the input is called in messages")
    sources: list[str] | None = Field(None, min_length=1, description="the web sources (default: all)")
    captioner: CaptionerSpec
    prompt: str | None = Field("Describe the image.", description="the captioning prompt (null: none, for BLIP)")
    resources: CapfiltResources = Field(default_factory=CapfiltResources)
    round: Int = Field(1, ge=1, description="the bootstrap round (labels)")


class FilterStepSpec(StrictModel):
    """The `capfilt-filter` component's config: the filter judges the web captions and, from the
    `captions` input, the synthetic ones; kept pairs make new shards (every image with at least
    one kept caption; rows outside the scope pass unchanged)."""

    data: str = operational("dedup", description="what the input is called in messages")
    sources: list[str] | None = Field(None, min_length=1, description="the web sources (default: all)")
    filter: FilterSpec
    apply_to: list[Literal["web", "synthetic"]] = Field(default_factory=lambda: ["web", "synthetic"], min_length=1)
    resources: CapfiltResources = Field(default_factory=CapfiltResources)
    shard_size: Int = Field(1000, ge=1, description="samples per output shard")
    round: Int = Field(1, ge=1, description="the bootstrap round (labels)")
