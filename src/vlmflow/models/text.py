"""Text towers for itc / siglip / itm: the tiny encoder from a config, or a pretrained CLIP, SigLIP
or BERT text transformer from a local Hugging Face folder.

Every tower maps caption ids and their 1/0 mask [B, L] (the recipe tokenizer's ids, no special
tokens, right-padded) to `states` [B, L, H] aligned with those ids (the match head reads them with
the same mask) and `pooled` [B, H'] (what the contrastive head projects into the shared space).

A pretrained tower is fed as its own tokenizer feeds it: the recipe's tokenizer is the folder's
(checked when the recipe is validated), and the tower adds the special tokens the folder's
tokenizer.json adds (CLIP <|startoftext|> … <|endoftext|>, BERT [CLS] … [SEP], SigLIP … </s>),
pads with the folder's pad token and maps ids the text model does not know (the tokens vlmflow
added to the tokenizer: <image>, <pad>, chat roles) to its unknown token.

Pooling and projection as in each paper:
- CLIP: the end-of-text token's output (HF's pooler_output, found by its place); the folder's `text_projection` (a
  CLIPTextModelWithProjection or a whole CLIPModel folder) is handed to the contrastive head as its
  text projection, else the head's own new linear layer projects.
- SigLIP: the sequence padded to the model's positions and no attention mask, as SigLIP was trained;
  the last position's output through the folder's `head`, which becomes the contrastive head's text
  projection.
- BERT (BLIP): the [CLS] output through a new linear projection (BLIP's text_proj). BLIP's
  image-grounded text encoder for ITM is the same BERT with cross-attention inserted in every layer;
  transformers' BertModel has cross-attention only as a causal decoder (add_cross_attention needs
  is_decoder, which makes its self-attention causal), so ITM is the model's match head instead:
  `match_layers` bidirectional cross-attention layers (new weights) on the BERT's states, as with
  tiny-text. The pretrained BERT is loaded without its pooler (BLIP does not use it).

The contrastive head's projections are the `heads` part (trainable with `heads`); the text
transformer is the `text` part.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    SiglipTextConfig,
    SiglipTextModel,
)

from vlmflow.errors import UserError
from vlmflow.models.language import TextEncoder
from vlmflow.specs.model import (
    HfBert,
    HfClipText,
    HfSiglipText,
    HfText,
    ModelSpec,
    TinyTextEncoder,
    hf_model_type_problem,
)


class HfTextTower(nn.Module):
    """A transformers text model fed its own special tokens; see the module docstring."""

    def __init__(self, model: PreTrainedModel, spec: HfText, specials: dict):
        super().__init__()
        self.model = model
        config = model.config
        self.hidden_size, self.heads = config.hidden_size, config.num_attention_heads
        self.max_length = spec.max_length
        self.prefix, self.suffix = specials["prefix"], specials["suffix"]
        self.pad, self.unk, self.vocab_size = specials["pad"], specials["unk"], config.vocab_size
        self.positions = config.max_position_embeddings
        self.fixed_length = isinstance(spec, HfSiglipText)  # padded to its positions, no mask: as SigLIP trained
        self.cls_pooled = isinstance(spec, HfBert)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, L, H] aligned with ids, pooled [B, H'])."""
        full, full_mask, end = self.model_inputs(ids, mask)
        unmasked = self.fixed_length or ids.is_meta  # meta (vlmflow plan): HF reads a mask's values
        out = self.model(input_ids=full, attention_mask=None if unmasked else full_mask)
        hidden = out.last_hidden_state
        start = len(self.prefix)
        states = hidden[:, start : start + ids.shape[1]]
        if self.cls_pooled:
            pooled = hidden[:, 0]
        elif self.fixed_length:
            pooled = out.pooler_output  # SigLIP: the last position, through its head (moved to the contrastive head)
        else:  # CLIP: the end-of-text token's output, found by place (an unknown token may share its id)
            pooled = hidden[torch.arange(len(hidden), device=hidden.device), end]
        return states, pooled

    def model_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prefix + the row's ids + suffix, then the pad id; its mask; each row's suffix position.
        Vectorised (meta tensors too)."""
        p, s = len(self.prefix), len(self.suffix)
        body = ids.shape[1]
        if p + body + s > self.positions:
            raise ValueError(f"{body} text tokens and {p + s} special ones exceed the text model's {self.positions}")
        ids = torch.where((ids >= 0) & (ids < self.vocab_size), ids, self.unk).masked_fill(mask == 0, self.pad)
        width = self.positions if self.fixed_length else p + body + s
        full = torch.full((ids.shape[0], width), self.pad, dtype=ids.dtype, device=ids.device)
        full[:, :p] = torch.tensor(self.prefix, dtype=ids.dtype, device=ids.device)
        full[:, p : p + body] = ids
        end = p + mask.sum(dim=1, keepdim=True)
        if s:
            where = end + torch.arange(s, device=ids.device)
            full.scatter_(1, where, torch.tensor(self.suffix, dtype=ids.dtype, device=ids.device).expand(len(ids), s))
        full_mask = (torch.arange(width, device=ids.device) < end + s).to(mask.dtype)
        return full, full_mask, end.squeeze(1)


def build_text(
    spec: ModelSpec, vocab_size: int, pad_id: int, load_weights: bool = True
) -> tuple[nn.Module, nn.Linear | None]:
    """(model.text's tower, its pretrained projection into the shared space or None). load_weights=False
    builds a local model from its config.json alone (shapes for `vlmflow plan`)."""
    text = spec.text
    if isinstance(text, TinyTextEncoder):
        return TextEncoder(text, vocab_size, pad_id), None
    folder = text.path
    if not (folder / "config.json").is_file():
        raise UserError(f"model.text.path: {folder} is not a Hugging Face model folder (no config.json)")
    if problem := hf_model_type_problem(folder, text.MODEL_TYPES, text.kind):
        raise UserError(f"model.text.path: {problem}")
    model = _load(text, load_weights)
    projection = None
    if isinstance(model, CLIPTextModelWithProjection):
        model, projection = model.text_model, model.text_projection
    elif isinstance(model, SiglipTextModel):
        projection, model.head = model.head, nn.Identity()
    if projection is not None and projection.out_features != spec.embed_dim:
        raise UserError(
            f"model.embed_dim: {spec.embed_dim}, but the text tower in {folder} projects into a shared space of "
            f"{projection.out_features}: set embed_dim: {projection.out_features}"
        )
    return HfTextTower(model, text, special_tokens(text, model.config)), projection


def _load(spec: HfText, load_weights: bool) -> PreTrainedModel:
    folder = spec.path
    config = json.loads((folder / "config.json").read_text())
    if isinstance(spec, HfClipText):
        projected = config.get("model_type") == "clip" or "CLIPTextModelWithProjection" in config.get(
            "architectures", []
        )
        cls, config_cls, extra = (CLIPTextModelWithProjection if projected else CLIPTextModel), CLIPTextConfig, {}
    elif isinstance(spec, HfSiglipText):
        cls, config_cls, extra = SiglipTextModel, SiglipTextConfig, {}
    else:
        cls, config_cls, extra = BertModel, BertConfig, {"add_pooling_layer": False}
    if load_weights:  # a concrete class: a folder's auto_map (remote code) is never used
        return cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32, **extra)
    return cls(config_cls.from_pretrained(str(folder), local_files_only=True), **extra)


def special_tokens(spec: HfText, config: object) -> dict:
    """What the folder's tokenizer wraps a text in (prefix, suffix ids), its pad and unknown ids;
    checks that the text and those tokens fit the model's positions."""
    folder = spec.path
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise UserError(
            f"model.text.path: {folder} has no tokenizer.json (the tokenizer its text tower was trained with)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception for unreadable files
        raise UserError(f"model.text.path: {file}: cannot load tokenizer: {exc}") from None
    encoding = tokenizer.encode("a", add_special_tokens=True)
    added = encoding.special_tokens_mask
    first = added.index(0) if 0 in added else len(added)
    last = len(added) - added[::-1].index(0) if 0 in added else len(added)
    prefix, suffix = encoding.ids[:first], encoding.ids[last:]
    if isinstance(spec, HfClipText) and not suffix:
        raise UserError(f"model.text.path: {file} adds no end-of-text token, where CLIP's text embedding is read")
    pad = _token_id(tokenizer, folder, "pad")
    pad = pad if pad is not None else getattr(config, "pad_token_id", None) or 0
    unk = _token_id(tokenizer, folder, "unk")
    if spec.max_length + len(prefix) + len(suffix) > config.max_position_embeddings:
        raise UserError(
            f"model.text.max_length: {spec.max_length} tokens and {len(prefix) + len(suffix)} special ones exceed the "
            f"{config.max_position_embeddings} positions of the text model in {folder}"
        )
    return {"prefix": prefix, "suffix": suffix, "pad": pad, "unk": unk if unk is not None else pad}


def _token_id(tokenizer: Tokenizer, folder: Path, name: str) -> int | None:
    """The id of the folder's `{name}_token` (tokenizer_config.json), if it names one the tokenizer has."""
    file = folder / "tokenizer_config.json"
    try:
        token = json.loads(file.read_text()).get(f"{name}_token") if file.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(token) if isinstance(token, str) else None
