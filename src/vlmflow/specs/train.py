"""The `stages:` list (training stages) and `runtime.train` (Ray Train workers)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from vlmflow.component import operational
from vlmflow.prompts import CAPTION_PROMPT, CHOICE_TEMPLATE, check_choice_template
from vlmflow.specs.base import Float, Int, StrictModel
from vlmflow.specs.data import NAME_PATTERN

MODULES = ("vision", "connector", "language", "text", "heads")


class Weighted(StrictModel):
    weight: Float = Field(1.0, gt=0, description="this objective's weight in the stage's loss")


class ItcObjective(Weighted):
    """CLIP InfoNCE over the batch (all workers' samples) with a learnable temperature."""

    kind: Literal["itc"]


class SiglipObjective(Weighted):
    """SigLIP pairwise sigmoid loss with learnable temperature and bias."""

    kind: Literal["siglip"]


class ItmObjective(Weighted):
    """Binary image-text matching; per image one negative text and per text one negative image,
    drawn (as in BLIP) from the softmax of the ITC similarities over the batch."""

    kind: Literal["itm"]
    edited_negatives: Int = Field(
        0,
        ge=0,
        le=8,
        description="NegCLIP-style extra negative texts per image: its caption with one place edited toward "
        "another caption of the batch (a token replaced, deleted or inserted); 0 (BLIP) adds none",
        exclude_if=lambda count: count == 0,  # off: the stage's spec, hence its cache key, is as before the option
    )


class ItgObjective(Weighted):
    """BLIP-2 stage 1: image-grounded text generation, the caption decoded by the Q-Former's text
    branch (model.text kind qformer) with the queries as its prefix; next-token loss."""

    kind: Literal["itg"]


class LmObjective(Weighted):
    """Next-token loss on the response only: prompt, image and padding positions are masked."""

    kind: Literal["lm"]


Objective = Annotated[
    ItcObjective | SiglipObjective | ItmObjective | ItgObjective | LmObjective, Field(discriminator="kind")
]


class LoraSpec(StrictModel):
    """LoRA adapters (peft) on one module; its base weights stay frozen."""

    module: Literal["language", "vision", "text"] = "language"
    r: Int = Field(8, ge=1)
    alpha: Float = Field(16.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class OptimizerSpec(StrictModel):
    kind: Literal["adamw"] = "adamw"
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.999)
    grad_clip: Float | None = Field(1.0, gt=0)


class ScheduleSpec(StrictModel):
    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: Int = Field(0, ge=0)
    min_lr_ratio: Float = Field(0.0, ge=0, le=1)


Format = Literal["caption", "qa", "conversations", "choice", "refer"]


class MixtureComponent(StrictModel):
    """One part of a stage's data mixture: an artifact's training rows in one format, drawn by
    weight (share of the mixture) or by a fixed count per epoch."""

    data: str = Field(description="the data artifact: ingest, dedup, instruct or capfilt")
    format: Format | None = Field(None, description="default: the stage's format")
    weight: Float | None = Field(None, gt=0, description="share of the mixture (default 1 unless count is set)")
    count: Int | None = Field(None, ge=1, description="samples drawn per epoch")
    replacement: bool = Field(False, description="draw with replacement (a count may exceed the rows)")
    sources: list[str] | None = Field(
        None, min_length=1, description="only rows of these data.sources (e.g. a clean subset); default: all"
    )

    @model_validator(mode="after")
    def _check(self) -> MixtureComponent:
        if self.weight is not None and self.count is not None:
            raise ValueError("give weight or count, not both")
        return self


class MixtureSpec(StrictModel):
    """Several data artifacts mixed into one stage, resolved deterministically from the seed."""

    mixture: list[MixtureComponent] = Field(min_length=1)
    total: Int | None = Field(None, ge=1, description="cap on samples per epoch (weights share what counts leave)")
    reshuffle: bool = Field(True, description="redraw the subsets and the order every epoch")


class TrainStageSpec(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    data: str | MixtureSpec = Field(
        "dedup", description="a data artifact (ingest, dedup or instruct) or a mixture of them"
    )
    format: Format = Field(
        "caption",
        description="caption: image + caption; qa: one of the sample's VQA pairs per epoch; "
        "conversations: the sample's conversation turns (instruction data); choice: one of the sample's "
        "multiple-choice items per epoch, answered with the option's letter; refer: one of the sample's objects "
        "named uniquely in it per epoch, asked `[refer] give me the location of the NAME` and answered with its box "
        "`{<x1><y1><x2><y2>}` on a 0-100 grid (MiniGPT-v2's grounding)",
    )
    prompt: str = Field(CAPTION_PROMPT, description="the user turn of the caption format")
    choice_template: str = Field(
        CHOICE_TEMPLATE,
        description="the user turn of the choice format (fields: question, options); keep it equal to the "
        "multiple-choice evaluation's template",
        exclude_if=lambda t: t == CHOICE_TEMPLATE,
    )
    template: Literal["auto", "vlmflow", "plain", "vicuna_v1", "llama_3", "chatml", "model"] = Field(
        "auto",
        description="the conversation template of the stage's samples (and of its model's prompts in evaluation "
        "and export): plain (LLaVA stage 1: the image, then the caption), vicuna_v1, llama_3, chatml (LLaVA's "
        "formats), model (the tokenizer's own chat_template), vlmflow (vlmflow's BPE tokens); auto: model when "
        "the tokenizer has a chat_template, vlmflow for vlmflow's tokenizers, else vicuna_v1",
        exclude_if=lambda t: t == "auto",  # the stage's spec, hence its cache key, is as before the option
    )
    overflow: Literal["quarantine", "truncate"] = Field(
        "quarantine",
        description="a sample longer than max_text_tokens: quarantine it (left out of training, listed in the "
        "stage's unused.parquet with the reason too-long:N tokens > MAX) or truncate it to max_text_tokens",
        exclude_if=lambda o: o == "quarantine",
    )
    trainable: list[Literal["vision", "connector", "language", "text", "heads"]] = Field(min_length=1)
    lora: LoraSpec | None = None
    objectives: list[Objective] = Field(min_length=1)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    epochs: Int = Field(1, ge=1)
    max_steps: Int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: Int = Field(32, ge=1, description="global batch per optimizer step")
    micro_batch_size: Int = Field(8, ge=1, description="per worker per forward pass")
    max_text_tokens: Int = Field(96, ge=8, description="text tokens per sample (image tokens come on top)")
    packing: bool = Field(
        False,
        description="sequence packing: the samples of a micro-batch share rows of up to one sample's longest "
        "(1 + image tokens + max_text_tokens), first-fit decreasing, instead of each padded to the longest; "
        "each sample attends only to itself, its positions restart at 0 and its loss is its own, so the loss "
        "is the padded batch's. The lm objective only",
        exclude_if=lambda on: not on,  # off: the stage's spec, hence its cache key, is as before the option
    )
    loader_workers: Int = operational(
        0,
        ge=0,
        le=32,
        description="processes per training worker that read, decode and collate the coming steps' batches "
        "while the current step trains; 0: the training thread does it between steps. The same steps see "
        "the same samples whatever the number",
    )
    hflip: Float = Field(
        0.0,
        ge=0,
        le=1,
        description="augmentation: the probability that a training image is mirrored left to right (drawn per "
        "sample and epoch from the seed). Off by default: a caption that says left or right turns false",
        exclude_if=lambda p: p == 0,  # off: the stage's spec, hence its cache key, is as before the option
    )
    shift: Int = Field(
        0,
        ge=0,
        le=64,
        description="augmentation: each training image is moved by up to this many pixels in x and y (after "
        "resizing; drawn per sample and epoch from the seed), the uncovered border repeating the edge. Off by "
        "default: a caption that says where something is may turn false",
        exclude_if=lambda p: p == 0,
    )
    precision: Literal["fp32", "bf16"] = "fp32"
    images_per_sequence: Int = Field(
        1,
        ge=1,
        le=64,
        description="Flamingo models (connector kind flamingo): each training sequence interleaves this many "
        "consecutive samples of a micro-batch, `<image>Question: ... Short answer: ...<eos>` each (M3W-style), "
        "so the text learns to read the latest image among several; batch sizes still count samples",
        exclude_if=lambda k: k == 1,  # one image: the stage's spec, hence its cache key, is as before the option
    )
    activation_checkpointing: bool = Field(
        False,
        description="keep only each transformer block's inputs from the forward pass and recompute the block "
        "in backward (non-reentrant, same RNG: dropout draws the same masks): activation memory falls to the "
        "block boundaries plus one block, for about a third more compute; the results are the same",
        exclude_if=lambda on: not on,  # off: the stage's spec, hence its cache key, is as before the option
    )
    init_from: str | None = operational(
        "previous", description="concise form: previous (default), a stage name, or null for fresh"
    )
    checkpoint_every: Int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_last: Int | None = operational(
        None,
        ge=1,
        description="keep only the last N checkpoints (checkpoints/step-*): older ones are removed once a "
        "newer one is complete; default: keep all",
    )
    eval_samples: Int = Field(128, ge=0, description="held-out samples scored at the end of the stage")

    _choice_template = field_validator("choice_template")(check_choice_template)

    @model_validator(mode="after")
    def _check(self) -> TrainStageSpec:
        kinds = [o.kind for o in self.objectives]
        if len(set(kinds)) != len(kinds):
            raise ValueError("an objective kind is listed twice")
        formats = {c.format or self.format for c in self.components()}
        if formats - {"caption"} and set(kinds) - {"lm"}:
            raise ValueError(f"format {sorted(formats - {'caption'})[0]} trains the lm objective only")
        if self.packing and set(kinds) != {"lm"}:
            others = ", ".join(sorted(set(kinds) - {"lm"}))
            raise ValueError(f"packing trains the lm objective only; {others} compare whole samples, one per row")
        if self.template == "plain" and formats != {"caption"}:
            raise ValueError("template plain (the image, then the caption) takes the caption format only")
        if self.lora is not None and self.lora.module in self.trainable:
            raise ValueError(f"lora.module {self.lora.module} is also in trainable; LoRA keeps its base frozen")
        return self

    def components(self) -> list[MixtureComponent]:
        """The stage's data as mixture components (a plain artifact name is one component)."""
        if isinstance(self.data, str):
            return [MixtureComponent(data=self.data)]
        return list(self.data.mixture)

    def artifacts(self) -> list[str]:
        """The distinct data artifacts the stage reads, in order of first use."""
        return list(dict.fromkeys(c.data for c in self.components()))


class TrainRuntime(StrictModel):
    num_workers: Int = Field(2, ge=1, description="Ray Train workers (DDP)")
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    cpus_per_worker: Int = Field(1, ge=1)
    max_failures: Int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    memory_per_worker_gb: Float | None = Field(
        None, gt=0, description="memory one worker may use (GPU memory with use_gpu); default: the local "
        "GPU's, or host RAM / num_workers; a stage whose plan needs more stops before it starts"
    )  # fmt: skip
    tflops_per_worker: Float | None = Field(
        None, gt=0, description="sustained TFLOP/s of one worker, for time estimates; default: measured "
        "on CPU, 100 on GPU (A100 bf16 at about a third of peak)"
    )  # fmt: skip
