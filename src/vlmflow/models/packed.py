"""Packed rows: several samples side by side in one row of a batch, told apart by segment ids.

A packed row holds samples 1, 2, … (segment ids 1, 2, …) followed by padding (segment 0).
Each sample attends only to itself (a block-diagonal causal mask), its position ids restart
at 0, and its loss is its own: the model sees every sample exactly as it would alone in a row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmflow.models.objectives import IGNORE


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] that restart at 0 where the segment id changes."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] mask letting a token see the earlier tokens of its own segment only: boolean
    (True: attends) for dtype bool, else additive (0 or the dtype's lowest value), as Hugging Face
    attention takes a prepared 4D mask (sdpa either, eager the additive one)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments.unsqueeze(2) == segments.unsqueeze(1)) & causal
    allowed = allowed.unsqueeze(1)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_lm_loss(logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """`objectives.lm_loss` over packed rows: next-token cross-entropy averaged per sample (segment),
    then over the samples that have answer tokens. Equal to lm_loss of the same samples unpacked: a
    sample's first token is never a target (nothing of it precedes it; the previous sample's last
    token does not predict it)."""
    batch, length = labels.shape[0], labels.shape[1] - 1
    targets = labels[:, 1:].masked_fill(segments[:, 1:] != segments[:, :-1], IGNORE)
    tokens = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(batch, length)
    width = int(segments.max()) + 1 if segments.numel() else 1
    owner = (segments[:, 1:] + width * torch.arange(batch, device=segments.device).unsqueeze(1)).reshape(-1)
    counted = torch.zeros(batch * width, device=tokens.device).index_add_(
        0, owner, (targets != IGNORE).reshape(-1).float()
    )
    sums = torch.zeros(batch * width, device=tokens.device).index_add_(0, owner, tokens.reshape(-1))
    has_answer = (counted > 0).float()
    return (sums / counted.clamp(min=1) * has_answer).sum() / has_answer.sum().clamp(min=1)
