"""Flamingo (Alayrac et al. 2022; as OpenFlamingo builds it): a perceiver resampler turns each
image's features into a few latents, and gated cross-attention dense blocks, inserted before every
N-th decoder layer of the language model, let the text attend to them.

The text holds one `<image>` token where each image stands. A token attends only to the latents
of the latest `<image>` at or before it (tokens before the first image attend to none: their
cross-attention output is zero). Each block is masked cross-attention then a feed-forward, each
added through a tanh gate initialised at 0, so at initialisation the language model computes
exactly what it computed alone.

The blocks belong to the `connector` part (with the resampler): the language model's own
modules and state-dict keys are untouched. They run in forward pre-hooks of its decoder layers,
reading the images that `condition` set for the current forward pass; a forward that continues
from a KV cache (generation) treats its new tokens as following the last image of their row.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from vlmflow.models.connectors import FeedForward, ResamplerLayer
from vlmflow.specs.model import FlamingoConnector


class MaskedCrossAttention(nn.Module):
    """Text queries, image-latent keys and values; token t sees image `token_image[t]` only (0: none)."""

    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, token_image: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], latents [B, K, M, Dm] (K images), token_image [B, T] (1-based image number, 0: none)."""
        b, t, _ = x.shape
        k, m = latents.shape[1], latents.shape[2]
        q = self.to_q(self.norm(x)).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        key, value = self.to_kv(latents.flatten(1, 2)).chunk(2, dim=-1)
        key = key.reshape(b, k * m, self.heads, self.head_dim).transpose(1, 2)
        value = value.reshape(b, k * m, self.heads, self.head_dim).transpose(1, 2)
        image_of_latent = torch.arange(1, k + 1, device=x.device).repeat_interleave(m)
        allowed = token_image.unsqueeze(-1) == image_of_latent  # [B, T, K*M]
        has_image = token_image > 0
        # A token without an image attends to every latent (a defined softmax) and its output is zeroed below.
        mask = (allowed | ~has_image.unsqueeze(-1)).unsqueeze(1)
        out = nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.to_out(out) * has_image.unsqueeze(-1).to(out.dtype)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(s * attn_gate) * xattn(x, images); then x + tanh(s * ff_gate) * ff(x). Gates start at 0;
    the scale s (1 in the paper) multiplies how fast AdamW opens them."""

    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int, ff_mult: int, gate_scale: float = 1.0):
        super().__init__()
        self.gate_scale = gate_scale
        self.attn = MaskedCrossAttention(dim, media_dim, heads, head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # 1-d, not a scalar: FSDP shards only tensors with a dim
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, latents: torch.Tensor, token_image: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, latents, token_image) * (self.gate_scale * self.attn_gate).tanh()
        return x + self.ff(x) * (self.gate_scale * self.ff_gate).tanh()


class PerceiverResampler(nn.Module):
    """Learned latents attend to [image features; latents], layer by layer; [N, F, D] -> [N, M, D]."""

    def __init__(self, dim: int, num_latents: int, layers: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"flamingo: image feature size {dim} is not a multiple of heads {heads}")
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, features)
        return self.norm(latents)


def decoder_layers(language: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a Llama-style causal LM (model.layers)."""
    layers = getattr(language.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        kind = type(language).__name__
        raise ValueError(f"flamingo: {kind} has no list of decoder layers (model.layers) to insert cross-attention")
    return layers


class Flamingo(nn.Module):
    """The connector part of a Flamingo model: the resampler and the gated cross-attention blocks,
    hooked into `language` (which stays a separate part). One `<image>` token per image."""

    out_tokens = 1  # `<image>` tokens per image in the text

    def __init__(self, spec: FlamingoConnector, media_dim: int, language: PreTrainedModel, image_id: int):
        super().__init__()
        self.image_id = image_id
        self.resampler = PerceiverResampler(media_dim, spec.num_latents, spec.layers, spec.heads)
        layers = decoder_layers(language)
        if spec.cross_attn_every > len(layers):
            raise ValueError(
                f"flamingo: cross_attn_every {spec.cross_attn_every} is more than the language model's "
                f"{len(layers)} decoder layers"
            )
        width = language.get_input_embeddings().embedding_dim
        self.inserted = [i for i in range(len(layers)) if (i + 1) % spec.cross_attn_every == 0]
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(
                width, media_dim, spec.cross_attn_heads, spec.cross_attn_head_dim, spec.ff_mult, spec.gate_scale
            )
            for _ in self.inserted
        )
        self.media: tuple[torch.Tensor, torch.Tensor] | None = None  # (latents, token_image) of this forward
        for block, i in zip(self.blocks, self.inserted, strict=True):
            layers[i].register_forward_pre_hook(self._hook(block, i), with_kwargs=True)

    def condition(self, input_ids: torch.Tensor, features: torch.Tensor) -> None:
        """Set the images of the next forward pass: features [B, K, F, D] of up to K images per row,
        the i-th `<image>` of a row standing for its i-th image (images past a row's last are padding)."""
        b, k = features.shape[:2]
        latents = self.resampler(features.flatten(0, 1)).unflatten(0, (b, k))
        is_image = input_ids == self.image_id
        if not input_ids.is_meta:
            counts = is_image.sum(dim=1)
            if bool((counts > k).any()):
                row = int((counts > k).nonzero()[0, 0])
                raise ValueError(f"flamingo: row {row} has {int(counts[row])} <image> tokens for {k} images")
        self.media = (latents, is_image.long().cumsum(dim=1))

    def _hook(self, block: GatedCrossAttentionBlock, index: int):
        def run(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = block(hidden, *self._media_for(hidden, kwargs.get("past_key_values"), index))
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return run

    def _media_for(self, hidden: torch.Tensor, cache: object, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, token_image) for `hidden`: the conditioned pass itself, or its continuation from the cache."""
        if self.media is None:
            raise RuntimeError("flamingo: the language model ran without images (call condition first)")
        latents, token_image = self.media
        cached = cache.get_seq_length(index) if cache is not None and not hidden.is_meta else 0
        if cached:  # generation: the new tokens come after the last image of their row
            token_image = token_image[:, -1:].expand(-1, hidden.shape[1])
        elif token_image.shape[1] != hidden.shape[1]:
            raise RuntimeError(f"flamingo: {hidden.shape[1]} tokens, but images were set for {token_image.shape[1]}")
        if latents.shape[0] != hidden.shape[0]:  # beam search: one prompt's beams share its images
            latents = latents.expand(hidden.shape[0], -1, -1, -1)
            token_image = token_image.expand(hidden.shape[0], -1)
        return latents, token_image
