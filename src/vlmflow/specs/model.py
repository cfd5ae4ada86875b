"""The `model:` section: vision tower, connector, language model and text encoder, each keyed by `kind:`.

Tiny parts are built from a config with random weights (tests, tiny twins); `hf-*` parts load
a local Hugging Face folder. Paths of local weights may be missing when a spec is validated
(full-size specs are checked on machines without the weights); building the model then
fails with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from vlmflow.specs.base import Float, Int, SpecPath, StrictModel


class FeatureChoice(StrictModel):
    feature_layer: Int = Field(-2, description="hidden state used as image features; -2 = penultimate (LLaVA)")
    select: Literal["patch", "all"] = Field("patch", description="patch: drop the CLS token (CLIP); all: keep it")


class TinyVit(FeatureChoice):
    """A small CLIP- or SigLIP-style ViT from a transformers config, random init."""

    kind: Literal["tiny-vit"]
    family: Literal["clip", "siglip"] = Field(
        "clip", description="clip: a CLIP vision config (CLS token); siglip: a SigLIP one (no CLS token)"
    )
    image_size: Int = Field(64, ge=8, le=1024, description="input pixels per side (images are resized to it)")
    patch_size: Int = Field(
        8, ge=2, le=64, description="pixels per side of a patch; image_size must be a multiple of it"
    )
    hidden_size: Int = Field(64, ge=8, description="width; a multiple of heads")
    layers: Int = Field(2, ge=1, description="transformer layers")
    heads: Int = Field(4, ge=1, description="attention heads")
    intermediate_size: Int = Field(128, ge=8, description="MLP width")

    @model_validator(mode="after")
    def _check(self) -> TinyVit:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.hidden_size % self.heads:
            raise ValueError("hidden_size must be a multiple of heads")
        return self


class HfVision(FeatureChoice):
    """A CLIP or SigLIP vision tower from a local Hugging Face folder (config.json + safetensors)."""

    kind: Literal["hf-clip-vision", "hf-siglip-vision"]
    path: SpecPath = Field(description="the local Hugging Face model folder (checked when the model is built)")


class NoVision(StrictModel):
    """Encoder-free (Fuyu): the connector sees raw image patches."""

    kind: Literal["none"]
    image_size: Int = Field(64, ge=8, le=4096, description="input pixels per side (images are resized to it)")
    patch_size: Int = Field(
        8, ge=2, le=64, description="pixels per side of a patch; image_size must be a multiple of it"
    )

    @model_validator(mode="after")
    def _check(self) -> NoVision:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        return self


Vision = Annotated[TinyVit | HfVision | NoVision, Field(discriminator="kind")]


class LinearConnector(StrictModel):
    """LLaVA: one linear projection per visual token."""

    kind: Literal["linear"]


class MlpConnector(StrictModel):
    """LLaVA-1.5: `layers` linear layers with GELU between them (mlp2x_gelu is layers: 2)."""

    kind: Literal["mlp"]
    layers: Int = Field(2, ge=2, le=8)


class QFormerConnector(StrictModel):
    """BLIP-2 / MiniGPT-4: learned queries, self-attention + cross-attention to image features,
    then a linear layer into the language model. With `text: {kind: qformer}` the Q-Former also has
    BLIP-2's text branch, which shares its self-attention layers (stage 1: itc, itm, itg)."""

    kind: Literal["qformer"]
    num_queries: Int = Field(32, ge=1)
    hidden_size: Int = Field(64, ge=8, description="width; a multiple of heads")
    layers: Int = Field(2, ge=1)
    heads: Int = Field(4, ge=1)
    cross_attention_freq: Int = Field(
        2, ge=1, description="the queries cross-attend to the image features in every Nth layer, from the first "
        "(BLIP-2: 2)"
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> QFormerConnector:
        if self.hidden_size % self.heads:
            raise ValueError("hidden_size must be a multiple of heads")
        return self


class ResamplerConnector(StrictModel):
    """Flamingo / Idefics perceiver resampler: latents attend to [features; latents]."""

    kind: Literal["resampler"]
    num_latents: Int = Field(16, ge=1)
    layers: Int = Field(2, ge=1)
    heads: Int = Field(4, ge=1)


class FlamingoConnector(StrictModel):
    """Flamingo: a perceiver resampler per image and gated cross-attention dense blocks (tanh gates
    at 0: the language model starts unchanged) before every `cross_attn_every`-th decoder layer of the
    language model. The text holds one `<image>` token per image; each token attends to the latest
    image at or before it. Train it with `trainable: [connector]` (the language model frozen)."""

    kind: Literal["flamingo"]
    num_latents: Int = Field(64, ge=1, description="resampler latents per image")
    layers: Int = Field(6, ge=1, description="resampler layers")
    heads: Int = Field(8, ge=1, description="resampler heads; the image feature size is a multiple of them")
    cross_attn_every: Int = Field(4, ge=1, description="a gated cross-attention block before every Nth LM layer")
    cross_attn_heads: Int = Field(8, ge=1, description="heads of the cross-attention")
    cross_attn_head_dim: Int = Field(64, ge=4, description="width of a cross-attention head")
    ff_mult: Int = Field(4, ge=1, description="the gated feed-forward's width over the LM's")
    gate_scale: Float = Field(
        1.0, gt=0, description="each gate is tanh(gate_scale * g), g from 0: above 1 it opens faster under AdamW "
        "(a tiny twin's random vision tower; the paper: 1)"
    )  # fmt: skip


class TokenConcatConnector(StrictModel):
    """MiniGPT-v2: concatenate k adjacent visual tokens, then project."""

    kind: Literal["token-concat"]
    k: Int = Field(4, ge=1)


class PixelShuffleConnector(StrictModel):
    """nanoVLM / Idefics3: space-to-depth on the patch grid by `scale`, then project."""

    kind: Literal["pixel-shuffle"]
    scale: Int = Field(2, ge=1)


class PatchLinearConnector(StrictModel):
    """Fuyu: raw image patches projected linearly into the language model (needs vision: none)."""

    kind: Literal["patch-linear"]


Connector = Annotated[
    LinearConnector
    | MlpConnector
    | QFormerConnector
    | ResamplerConnector
    | TokenConcatConnector
    | PixelShuffleConnector
    | PatchLinearConnector
    | FlamingoConnector,
    Field(discriminator="kind"),
]


class TinyLlama(StrictModel):
    """A small Llama-style causal LM from a transformers LlamaConfig, random init; the
    vocabulary size comes from the recipe's tokenizer."""

    kind: Literal["tiny-llama"]
    hidden_size: Int = Field(64, ge=8, description="width; a multiple of heads")
    layers: Int = Field(2, ge=1, description="transformer layers")
    heads: Int = Field(4, ge=1, description="attention heads")
    kv_heads: Int | None = Field(None, ge=1, description="default: heads")
    intermediate_size: Int = Field(128, ge=8, description="MLP width")
    max_positions: Int = Field(512, ge=16, description="longest sequence (image and text tokens)")

    @model_validator(mode="after")
    def _check(self) -> TinyLlama:
        if self.hidden_size % self.heads:
            raise ValueError("hidden_size must be a multiple of heads")
        return self


class HfCausalLm(StrictModel):
    """A causal LM from a local Hugging Face folder; its tokenizer must be the recipe's
    (`tokenizer: {kind: pretrained, path: SAME_FOLDER}`)."""

    kind: Literal["hf-causal-lm"]
    path: SpecPath = Field(description="the local Hugging Face model folder (checked when the model is built)")


Language = Annotated[TinyLlama | HfCausalLm, Field(discriminator="kind")]


class TinyTextEncoder(StrictModel):
    """A small bidirectional transformer text encoder (dual-encoder and BLIP recipes)."""

    kind: Literal["tiny-text"]
    hidden_size: Int = Field(64, ge=8, description="width; a multiple of heads")
    layers: Int = Field(2, ge=1, description="transformer layers")
    heads: Int = Field(4, ge=1, description="attention heads")
    max_length: Int = Field(64, ge=4, description="longest text in tokens")
    match_layers: Int = Field(
        1,
        ge=1,
        le=12,
        description="layers of the ITM head, where the text states cross-attend to the image (BLIP's image-grounded "
        "text encoder). With one, the first token asks the image once what the whole caption says; with two or "
        "more, each word checks its own part of the image and the first token gathers the answers",
        exclude_if=lambda layers: layers == 1,  # the spec, hence the cache key, of a model without it is as before
    )


def hf_model_type_problem(folder: Path, accepted: tuple[str, ...], what: str) -> str | None:
    """Why the Hugging Face folder's config.json is not one of the `accepted` model types (None: it is,
    or the folder or its config.json is absent: checked again when the model is built)."""
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{config}: cannot read it as JSON: {exc}"
    found = data.get("model_type") if isinstance(data, dict) else None
    if not config.is_file() or found in accepted:
        return None
    return (
        f"{folder} holds a {found or 'model of no model_type'} model; {what} takes model_type {' or '.join(accepted)}"
    )


class HfText(StrictModel):
    """A pretrained text tower from a local Hugging Face folder (config.json, safetensors and the
    tokenizer.json it was trained with). The recipe's tokenizer must be that folder's
    (`tokenizer: {kind: pretrained, path: SAME_FOLDER}`); the tower adds the special tokens its
    tokenizer adds (CLIP's start/end of text, BERT's [CLS]/[SEP], SigLIP's </s>)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    kind: str  # each kind's Literal
    path: SpecPath = Field(description="the local Hugging Face model folder (its model type is checked when it exists)")
    max_length: Int = Field(64, ge=1, description="longest text in tokens, without the tower's special tokens")
    match_layers: Int = Field(1, ge=1, le=12, description="layers of the ITM head (as tiny-text's match_layers)")

    @field_validator("path")
    @classmethod
    def _model_type(cls, path: Path) -> Path:
        problem = hf_model_type_problem(path, cls.MODEL_TYPES, cls.model_fields["kind"].annotation.__args__[0])
        if problem:
            raise ValueError(problem)
        return path


class HfClipText(HfText):
    """CLIP's text transformer (a CLIPTextModel, CLIPTextModelWithProjection or whole CLIPModel folder):
    the end-of-text token's output is the text's embedding; the folder's text_projection (a
    ...WithProjection or CLIPModel folder) projects it into the shared space (embed_dim must be its
    projection_dim), else a new linear layer does."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("clip_text_model", "clip")
    kind: Literal["hf-clip-text"]
    max_length: Int = Field(75, ge=1, description="longest text in tokens, without the start/end tokens")


class HfSiglipText(HfText):
    """SigLIP's text transformer (a SiglipTextModel or whole SiglipModel folder), fed as it was
    trained: padded to its positions with no attention mask; the last position's output through the
    folder's head is the text's embedding (embed_dim must be the head's projection_size)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("siglip_text_model", "siglip")
    kind: Literal["hf-siglip-text"]
    max_length: Int = Field(63, ge=1, description="longest text in tokens, without the end token")


class HfBert(HfText):
    """BERT (BLIP's text encoder, a BertModel or BertFor... folder): the [CLS] output, through a new
    linear layer, is the text's ITC embedding; ITM is the model's match head (`match_layers` layers of
    cross-attention to the image on the BERT's states, new weights)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("bert",)
    kind: Literal["hf-bert"]
    max_length: Int = Field(62, ge=1, description="longest text in tokens, without [CLS] and [SEP]")


class QFormerText(StrictModel):
    """BLIP-2: the Q-Former's own text branch (needs connector kind qformer): word and position
    embeddings, a feed-forward per Q-Former layer beside the queries' own, the self-attention shared
    with the queries. Its [CLS] output is the text's ITC embedding; ITM reads the queries' outputs
    with text and queries seeing each other; itg decodes the caption with the queries as a prefix."""

    kind: Literal["qformer"]
    max_length: Int = Field(32, ge=1, description="longest text in tokens, without [CLS] / [DEC]")


Text = Annotated[TinyTextEncoder | HfClipText | HfSiglipText | HfBert | QFormerText, Field(discriminator="kind")]


class ModelSpec(StrictModel):
    vision: Vision
    connector: Connector | None = Field(None, description="needed with a language model")
    language: Language | None = Field(None, description="a causal LM for the lm objective")
    text: Text | None = Field(None, description="a text encoder for itc / siglip / itm")
    embed_dim: Int = Field(64, ge=4, description="shared embedding size of itc / siglip")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.language is not None and self.connector is None:
            raise ValueError("a language model needs a connector to turn image features into its tokens")
        patch_linear = self.connector is not None and self.connector.kind == "patch-linear"
        if patch_linear != (self.vision.kind == "none"):
            raise ValueError("connector patch-linear goes with vision kind none, and only with it")
        if self.language is None and self.text is None:
            raise ValueError("a model needs a language model, a text encoder, or both")
        flamingo = isinstance(self.connector, FlamingoConnector)
        if flamingo and isinstance(self.language, TinyLlama) and self.connector.cross_attn_every > self.language.layers:
            raise ValueError("connector flamingo: cross_attn_every is more than the language model's layers")
        if isinstance(self.text, QFormerText) and not isinstance(self.connector, QFormerConnector):
            raise ValueError("text kind qformer is the Q-Former's text branch: it needs connector kind qformer")
        return self
