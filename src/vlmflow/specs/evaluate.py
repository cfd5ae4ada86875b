"""The `evaluate:` list: evaluation tasks (keyed by `kind:`), each with its model, data and generation.

A task's model is a training stage of the recipe (default: the last one). Its data is the
held-out split of a data artifact of the recipe (synthetic shapes: truth known) or a user
file: COCO captions JSON, VQAv2 questions + annotations JSON, an image folder with one
sub-folder per class, or multiple-choice JSONL or MMBench-style TSV. As with the data sources,
an image path of a user file stays inside its dataset folder unless `allow_outside_paths`, and
an image over `max_image_bytes` is quarantined as too-large.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from vlmflow.component import operational
from vlmflow.prompts import CAPTION_PROMPT, CHOICE_TEMPLATE, check_choice_template
from vlmflow.specs.base import ExistingDir, ExistingFile, Float, Int, StrictModel
from vlmflow.specs.data import (
    DEFAULT_MAX_IMAGE_BYTES,
    NAME_PATTERN,
    allow_outside_paths_field,
    max_image_bytes_field,
)


class HeldOutData(StrictModel):
    """The held-out split of a data artifact of this recipe (ingest, dedup or instruct)."""

    kind: Literal["held-out"]
    artifact: str = Field("dedup", description="the data artifact; default dedup")
    split: Literal["val", "test"] = "test"


class CocoCaptionsData(StrictModel):
    """COCO captions JSON: `images` [{id, file_name}] and `annotations` [{image_id, caption}]."""

    kind: Literal["coco-captions"]
    annotations: ExistingFile
    images: ExistingDir
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()


class VqaData(StrictModel):
    """VQAv2-style `questions` [{question_id, image_id, question}] and `annotations`
    [{question_id, answers: [{answer}]}] JSON; image files named by `image_pattern`."""

    kind: Literal["vqav2"]
    questions: ExistingFile
    annotations: ExistingFile
    images: ExistingDir
    image_pattern: str = Field("COCO_val2014_{image_id:012d}.jpg", description="file name of an image id")
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()


class ImageFolderClasses(StrictModel):
    """Classification images: one sub-folder per class, named after it."""

    kind: Literal["image-folder"]
    path: ExistingDir
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()


class ChoiceTsv(StrictModel):
    """MMBench-style TSV: columns index, question, hint (optional), A, B, C, D (the options a row
    has), answer (a letter) and image (base64 bytes), as VLMEvalKit distributes MMBench."""

    kind: Literal["multiple-choice-tsv"]
    path: ExistingFile
    max_image_bytes: Int = Field(
        DEFAULT_MAX_IMAGE_BYTES,
        ge=1,
        description="largest image a row's base64 holds, in bytes; a bigger one is quarantined as too-large "
        "(its size is checked before decoding)",
    )


class ChoiceJsonl(StrictModel):
    """One question per line: {"id", "image", "question", "options": {"A": ..} or [..], "answer": "A"}."""

    kind: Literal["multiple-choice-jsonl"]
    path: ExistingFile
    images: ExistingDir
    allow_outside_paths: bool = allow_outside_paths_field()
    max_image_bytes: Int = max_image_bytes_field()


class Generation(StrictModel):
    """How answers and captions are generated (batched, left-padded, with a KV cache)."""

    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    max_new_tokens: Int = Field(16, ge=1, le=512)
    num_beams: Int = Field(3, ge=1, le=16, description="beam strategy only")
    temperature: Float = Field(1.0, gt=0, description="sample strategy only")
    top_p: Float = Field(1.0, gt=0, le=1, description="sample strategy only")


class TaskBase(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="the stage is eval-NAME")
    model: str | None = operational(None, description="concise form: a training stage; default: the last one")
    samples: Int = Field(128, ge=1, description="evaluate at most this many items (in dataset order)")
    batch_size: Int = Field(16, ge=1, description="items per batch on an actor")
    actors: Int = operational(1, ge=1, description="Ray actors, each holding the model once")
    gpus: Float = Field(0, ge=0, le=8, description="GPUs per actor (0.5: two actors share one); > 0 runs on CUDA")
    examples: Int = Field(8, ge=0, le=64, description="items rendered into examples.png")


HeldOutOr = Field(default_factory=lambda: HeldOutData(kind="held-out"), discriminator="kind")


class ZeroShotTask(TaskBase):
    """Top-1/top-5 accuracy over class names put through prompt templates (averaged: an ensemble).
    Dual encoders rank by embedding similarity; generative VLMs by the likelihood of each class text."""

    kind: Literal["zero-shot-classification"]
    data: Annotated[HeldOutData | ImageFolderClasses, HeldOutOr]
    classes: list[str] | None = Field(None, min_length=2, description="default: the labels found in the data")
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)
    prompt: str = Field("What is in the image?", description="the user turn (likelihood ranking)")
    method: Literal["auto", "embedding", "likelihood"] = Field("auto", description="auto: embedding if it can")

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, templates: list[str]) -> list[str]:
        bad = [t for t in templates if t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1]
        if bad:
            raise ValueError(f"template {bad[0]!r} must hold exactly one {{}} for the class name")
        return templates


class RetrievalTask(TaskBase):
    """Image->text and text->image Recall@K (several captions per image, as COCO/Flickr)."""

    kind: Literal["retrieval"]
    data: Annotated[HeldOutData | CocoCaptionsData, HeldOutOr]
    ks: list[Int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)


class MatchingTask(TaskBase):
    """Image-text matching (BLIP's ITM head): every image with its own caption and with a caption of
    another image (drawn from the seed, a different text), so matched and mismatched pairs are
    balanced; accuracy of the head's match/no-match and the AUC of its P(match), chance 0.5 each."""

    kind: Literal["image-text-matching"]
    data: Annotated[HeldOutData | CocoCaptionsData, HeldOutOr]


class CaptioningTask(TaskBase):
    """BLEU-1..4 and CIDEr-D (COCO PTB tokenisation, as pycocoevalcap)."""

    kind: Literal["captioning"]
    data: Annotated[HeldOutData | CocoCaptionsData, HeldOutOr]
    prompt: str = CAPTION_PROMPT
    generation: Generation = Field(default_factory=lambda: Generation(max_new_tokens=24))


class VqaTask(TaskBase):
    """VQAv2 soft accuracy and exact match."""

    kind: Literal["vqa"]
    data: Annotated[HeldOutData | VqaData, HeldOutOr]
    shots: Int = Field(
        0,
        ge=0,
        le=32,
        description="few-shot: this many in-context examples (image, question, answer) from the train split of "
        "the held-out data's artifact precede each question, drawn per question from the seed (Flamingo models)",
        exclude_if=lambda n: n == 0,
    )
    generation: Generation = Field(default_factory=lambda: Generation(max_new_tokens=8))


class MultipleChoiceTask(TaskBase):
    """Accuracy of the option extracted from the generated answer, and the extraction failure rate."""

    kind: Literal["multiple-choice"]
    data: Annotated[HeldOutData | ChoiceJsonl | ChoiceTsv, HeldOutOr]
    template: str = Field(
        CHOICE_TEMPLATE,
        description="fields: question, options (a stage trained on the choice format asks "
        "with its choice_template: keep the two equal)",
    )
    generation: Generation = Field(default_factory=lambda: Generation(max_new_tokens=8))

    _template = field_validator("template")(check_choice_template)


class GroundingTask(TaskBase):
    """Referring-expression grounding (MiniGPT-v2's `[refer]` task): the box written in the answer as
    `{<x1><y1><x2><y2>}` (0-100 grid) against the object's; accuracy at IoU >= 0.5 and mean IoU, each
    beside the better of two blind guesses (the mean box per object name, the whole image). Items: every
    held-out object whose name (color and shape, or category) is unique in its image."""

    kind: Literal["grounding"]
    data: Annotated[HeldOutData, HeldOutOr]
    generation: Generation = Field(default_factory=lambda: Generation(max_new_tokens=24))


EvalTask = Annotated[
    ZeroShotTask | RetrievalTask | MatchingTask | CaptioningTask | VqaTask | MultipleChoiceTask | GroundingTask,
    Field(discriminator="kind"),
]
GENERATIVE = ("captioning", "vqa", "multiple-choice", "grounding")
