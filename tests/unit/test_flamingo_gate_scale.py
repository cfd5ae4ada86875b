"""gate_scale: the gates are tanh(gate_scale * g), still 0 at initialisation (the language model
unchanged), with a gradient gate_scale times the paper's, so AdamW opens them that much faster."""

from __future__ import annotations

import torch

from vlmflow.models.flamingo import GatedCrossAttentionBlock


def block(scale: float) -> GatedCrossAttentionBlock:
    torch.manual_seed(0)
    return GatedCrossAttentionBlock(dim=16, media_dim=8, heads=2, head_dim=4, ff_mult=2, gate_scale=scale)


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=generator)
    latents = torch.randn(2, 1, 3, 8, generator=generator)
    return x, latents, torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_a_scaled_gate_starts_closed_and_its_gradient_is_scaled():
    x, latents, token_image = inputs()
    plain, scaled = block(1.0), block(30.0)
    assert torch.equal(scaled(x, latents, token_image), x)  # gates at 0: the block passes x through
    for model in (plain, scaled):
        model(x, latents, token_image).square().sum().backward()
    assert plain.attn_gate.grad.abs().item() > 0
    torch.testing.assert_close(scaled.attn_gate.grad, 30 * plain.attn_gate.grad)
    torch.testing.assert_close(scaled.ff_gate.grad, 30 * plain.ff_gate.grad)
