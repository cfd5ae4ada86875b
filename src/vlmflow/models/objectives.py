"""Training objectives as pure functions of embeddings/logits, plus the small heads they need."""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def itc_loss(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """CLIP InfoNCE: symmetric cross-entropy over the cosine-similarity matrix times exp(log_scale)."""
    logits = contrastive_logits(image, text, log_scale)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP: -mean over images of sum over texts of log sigmoid(z_ij * (t * cos_ij + b)), z = +1 on the diagonal."""
    logits = contrastive_logits(image, text, log_scale) + bias
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def contrastive_logits(image: torch.Tensor, text: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """[images, texts] scaled cosine similarities. An image with one embedding per query ([B, Q, E],
    BLIP-2's Q-Former) scores each text with its most similar query."""
    scale = log_scale.clamp(max=math.log(100.0)).exp()
    similarity = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    return scale * (similarity.amax(dim=1) if image.dim() == 3 else similarity)


def hardest_negatives(similarity: torch.Tensor, same_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image the most similar text that is not its own (nor an identical caption), and
    for each text the most similar such image (BLIP mines ITM negatives from ITC similarity)."""
    blocked = similarity.masked_fill(same_text, float("-inf"))
    return blocked.argmax(dim=1), blocked.argmax(dim=0)


def sampled_negatives(
    similarity: torch.Tensor, same_text: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's ITM negatives: for each image a text drawn from softmax(similarity) over the texts
    that are not its own (nor an identical caption), and for each text such an image. Hard but
    not always the hardest: on noisy pairs the most similar other caption is often a true one.
    Rows with no candidate (every text identical) get an arbitrary index; the caller drops them."""
    blocked = similarity.float().masked_fill(same_text, float("-inf"))
    return _draw(blocked, generator), _draw(blocked.T, generator)


def _draw(blocked: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    none = torch.isinf(blocked).all(dim=1, keepdim=True)
    weights = torch.softmax(blocked.masked_fill(none, 0.0), dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def edited_negatives(
    ids: torch.Tensor, mask: torch.Tensor, count: int, pad: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NegCLIP-style hard negative texts (Yuksekgonul et al. 2023), built only from the batch: for
    each caption and each of `count` draws, another caption of the batch with a different text is
    drawn, the two token sequences are aligned (difflib) and one of their differences is carried
    over into the caption: one token replaced by the other caption's aligned token, one token
    deleted, or the other caption's inserted span inserted. The result differs from the caption
    in one place, so a matching head must read every token to reject it (an ordinary in-batch
    negative differs in many). Nothing about the vocabulary or the data is assumed.

    ids, mask: (B, L) token ids padded with `pad`; edits are cut to L tokens. Returns (B * count, L')
    ids and mask, rows in the order (caption 0 draw 0, caption 0 draw 1, ...), and a (B * count,)
    bool `usable`: False where the batch had no other text or the edit gave back the caption itself
    (the caller drops those)."""
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
    width = ids.shape[1]
    out, usable = [], []
    for row in rows:
        others = [j for j, other in enumerate(rows) if other != row]
        for _ in range(count):
            if not others:
                out.append(row)
                usable.append(False)
                continue
            other = rows[others[_randint(len(others), generator)]]
            edits = _edits(row, other)
            edited = edits[_randint(len(edits), generator)] if edits else row
            out.append(edited[:width] or row)
            usable.append(edited[:width] != row and bool(edited[:width]))
    new_ids, new_mask = pad_rows(out, pad)
    return new_ids.to(ids), new_mask.to(mask), torch.tensor(usable, device=ids.device)


def _randint(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def _edits(row: list[int], other: list[int]) -> list[list[int]]:
    """Every one-place edit of `row` toward `other` along their alignment."""
    edits = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=row, b=other, autojunk=False).get_opcodes():
        if tag == "replace":
            for k in range(i1, i2):
                token = other[j1 + min(k - i1, j2 - j1 - 1)]
                edits.append([*row[:k], token, *row[k + 1 :]])
        elif tag == "delete":
            edits.extend(row[:k] + row[k + 1 :] for k in range(i1, i2))
        elif tag == "insert":
            edits.append(row[:i1] + other[j1:j2] + row[i1:])
    return [e for e in edits if e != row]


def pad_rows(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], mask [B, L]) of token rows right-padded with `value` to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def itm_loss(match_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(match_logits, labels)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled IGNORE (prompt, image, padding) do not count.

    Averaged per sample, then over the samples that have answer tokens: a one-word VQA answer
    weighs as much as a long conversation, so a mixture's shares are its samples' shares (a
    token average would let long conversations drown short answers)."""
    batch, length = labels.shape[0], labels.shape[1] - 1
    targets = labels[:, 1:]
    tokens = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(batch, length)
    counted = (targets != IGNORE).sum(dim=1)
    per_sample = tokens.sum(dim=1) / counted.clamp(min=1)
    has_answer = (counted > 0).to(per_sample.dtype)
    return (per_sample * has_answer).sum() / has_answer.sum().clamp(min=1)


class ContrastiveHead(nn.Module):
    """Projections into a shared space; CLIP's temperature (init 1/0.07) and SigLIP's bias (init -10).
    `text_proj`: a pretrained text tower's own projection into the shared space (default: a new one)."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, text_proj: nn.Linear | None = None):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = text_proj if text_proj is not None else nn.Linear(text_dim, embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.bias = nn.Parameter(torch.tensor(-10.0))


class MatchHead(nn.Module):
    """ITM: text states cross-attend to image features (`layers` decoder layers), first token -> 2 logits."""

    def __init__(self, image_dim: int, text_dim: int, heads: int, layers: int = 1):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, text_dim)
        layer = nn.TransformerDecoderLayer(
            text_dim, heads, 4 * text_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.fusion = nn.TransformerDecoder(layer, layers)
        self.classifier = nn.Linear(text_dim, 2)

    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        fused = self.fusion(text_states, self.image_proj(features), tgt_key_padding_mask=text_mask == 0)
        return self.classifier(fused[:, 0])
