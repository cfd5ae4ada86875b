"""Connectors: image features [B, N, D_in] -> language-model tokens [B, M, D_out].

One small module per literature design, all with the same constructor
(spec, in_dim, out_dim, in_tokens) and an `out_tokens` attribute (M).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmflow.registry import Registry
from vlmflow.specs import model as specs

CONNECTORS: Registry[type[nn.Module]] = Registry("connector")


@CONNECTORS.decorator("linear")
class Linear(nn.Module):
    def __init__(self, spec: specs.LinearConnector, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.out_tokens = in_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


@CONNECTORS.decorator("mlp")
class Mlp(nn.Module):
    def __init__(self, spec: specs.MlpConnector, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(spec.layers - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)
        self.out_tokens = in_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class ResamplerLayer(nn.Module):
    """Flamingo: latents attend to the concatenation of image features and latents."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_features = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = FeedForward(dim)

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_features(features), q], dim=1)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


@CONNECTORS.decorator("resampler")
class Resampler(nn.Module):
    def __init__(self, spec: specs.ResamplerConnector, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__()
        if in_dim % spec.heads:
            raise ValueError(f"resampler: feature size {in_dim} is not a multiple of heads {spec.heads}")
        self.latents = nn.Parameter(torch.randn(spec.num_latents, in_dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(in_dim, spec.heads) for _ in range(spec.layers))
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)
        self.out_tokens = spec.num_latents

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, features)
        return self.proj(self.norm(latents))


@CONNECTORS.decorator("token-concat")
class TokenConcat(nn.Module):
    """MiniGPT-v2: k adjacent tokens concatenated into one, then projected."""

    def __init__(self, spec: specs.TokenConcatConnector, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__()
        if in_tokens % spec.k:
            raise ValueError(f"token-concat: {in_tokens} image tokens are not a multiple of k={spec.k}")
        self.k = spec.k
        self.proj = nn.Linear(in_dim * spec.k, out_dim)
        self.out_tokens = in_tokens // spec.k

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape
        return self.proj(features.reshape(b, n // self.k, d * self.k))


@CONNECTORS.decorator("pixel-shuffle")
class PixelShuffle(nn.Module):
    """Space-to-depth on the square patch grid (nanoVLM / Idefics3), then a linear projection."""

    def __init__(self, spec: specs.PixelShuffleConnector, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__()
        grid = math.isqrt(in_tokens)
        if grid * grid != in_tokens or grid % spec.scale:
            raise ValueError(
                f"pixel-shuffle: {in_tokens} image tokens are not a square grid divisible by scale={spec.scale} "
                "(select: patch drops the CLS token)"
            )
        self.grid, self.scale = grid, spec.scale
        self.proj = nn.Linear(in_dim * spec.scale**2, out_dim)
        self.out_tokens = (grid // spec.scale) ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, d = features.shape
        g, s = self.grid, self.scale
        x = features.reshape(b, g // s, s, g // s, s, d).permute(0, 1, 3, 2, 4, 5)
        return self.proj(x.reshape(b, (g // s) ** 2, s * s * d))


@CONNECTORS.decorator("patch-linear")
class PatchLinear(nn.Module):
    """Fuyu: flattened raw patches straight into the LM width."""

    def __init__(self, spec: specs.PatchLinearConnector, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.out_tokens = in_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


def build_connector(spec: specs.Connector, in_dim: int, out_dim: int, in_tokens: int) -> nn.Module:
    return CONNECTORS.get(spec.kind)(spec, in_dim, out_dim, in_tokens)


from vlmflow.models import qformer  # noqa: E402, F401  (registers "qformer"; it builds on FeedForward above)
