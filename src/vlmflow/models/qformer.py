"""BLIP-2's Q-Former (Li et al. 2023): learned queries and text tokens in one BERT-style stack.

Every layer has one self-attention over [queries; text], shared by both; the queries alone
cross-attend to the frozen image features, in every `cross_attention_freq`-th layer from the
first; queries and text each have their own feed-forward. What sees what is an attention mask:

- unimodal (ITC): queries see queries, text sees text; the image embedding is the query outputs
  (one per query), the text embedding the [CLS] output, and their similarity the best query's.
- bidirectional (ITM): everything sees everything; the match logit is the mean over the queries'
  outputs of a linear head.
- causal (ITG): the text sees every query and the text before it, the queries only the queries;
  the caption is decoded from a [DEC] token, queries as its prefix, by a head tied to the words.

Stage 2 feeds the query outputs, through `proj`, into the language model as a soft prompt
(`QFormer.forward`, the connector contract): the text branch is not used there.

The queries' parameters (queries, layers, cross-attention, their feed-forward, `proj`) are the
connector; the text branch's own (embeddings, the text feed-forward of each layer, the ITG head)
are the model's `text` part (`QFormerTextBranch`), so a stage trains or freezes them apart.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlmflow.models.connectors import CONNECTORS, FeedForward
from vlmflow.models.objectives import IGNORE, ContrastiveHead, lm_loss
from vlmflow.specs import model as specs

Mode = Literal["unimodal", "bidirectional", "causal"]
CLS, DEC = 0, 1  # rows of QFormerTextBranch.starts


def attention_mask(mode: Mode, queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, S] bool, True where position i may attend to position j; S = queries + text length
    (text_mask [B, L], 1 for a token, 0 for padding). Padded text positions are never attended to;
    every position, padding included, attends to something (no empty row)."""
    batch, length = text_mask.shape
    size = queries + length
    is_query = torch.arange(size, device=text_mask.device) < queries
    valid = torch.cat([torch.ones(batch, queries, dtype=torch.bool, device=text_mask.device), text_mask.bool()], 1)
    same = is_query[:, None] == is_query[None, :]
    if mode == "bidirectional":
        allowed = torch.ones(size, size, dtype=torch.bool, device=text_mask.device)
    elif mode == "unimodal":
        allowed = same
    else:  # causal: the queries among themselves; text to every query and the text up to itself
        order = torch.arange(size, device=text_mask.device)
        allowed = is_query[None, :] | (~is_query[:, None] & (order[None, :] <= order[:, None]))
    return allowed.unsqueeze(0) & valid.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if mask is None else mask.unsqueeze(1)  # one mask for every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class QFormerLayer(nn.Module):
    """Pre-norm: shared self-attention over [queries; text], the queries' cross-attention (when it has
    one), then each branch's feed-forward (the text's is handed in: it belongs to the text part)."""

    def __init__(self, dim: int, feature_dim: int, heads: int, cross: bool):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.cross_attn = Attention(dim, heads, feature_dim) if cross else None
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        queries: int,
        features: torch.Tensor | None,
        mask: torch.Tensor | None,
        text_ff: nn.Module | None = None,
    ) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, mask)
        q, t = x[:, :queries], x[:, queries:]
        if queries and self.cross_attn is not None:
            q = q + self.cross_attn(self.norm_cross(q), features)
        parts = [q + self.ff(q)] if queries else []
        if t.shape[1]:
            parts.append(t + text_ff(t))
        return torch.cat(parts, dim=1)


@CONNECTORS.decorator("qformer")
class QFormer(nn.Module):
    """The queries' side of the Q-Former and MiniGPT-4's single linear layer into the LM."""

    def __init__(self, spec: specs.QFormerConnector, in_dim: int, out_dim: int, in_tokens: int):
        super().__init__()
        dim = spec.hidden_size
        self.queries = nn.Parameter(torch.randn(spec.num_queries, dim) * 0.02)
        self.feature_norm = nn.LayerNorm(in_dim)
        self.layers = nn.ModuleList(
            QFormerLayer(dim, in_dim, spec.heads, cross=i % spec.cross_attention_freq == 0) for i in range(spec.layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        self.out_tokens = spec.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Stage 2 (and MiniGPT-4): the query outputs projected into the language model's width."""
        queries, _ = self.encode(features, None, None, "unimodal")
        return self.proj(queries)

    def encode(
        self,
        features: torch.Tensor | None,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        mode: Mode,
        text_ffs: nn.ModuleList | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query outputs [B, Q, H], text outputs [B, L, H]). `features` None: no queries (the text
        alone, as under the unimodal mask); `text` None: the queries alone."""
        parts, queries = [], 0
        if features is not None:
            features = self.feature_norm(features)
            parts.append(self.queries.unsqueeze(0).expand(features.shape[0], -1, -1))
            queries = self.out_tokens
        if text is not None:
            parts.append(text)
        x = torch.cat(parts, dim=1)
        mask = None if text is None else attention_mask(mode, queries, text_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, queries, features, mask, None if text_ffs is None else text_ffs[i])
        x = self.norm(x)
        return x[:, :queries], x[:, queries:]


class QFormerTextBranch(nn.Module):
    """The text branch's own parameters: word and position embeddings, the [CLS] and [DEC] start
    tokens, one feed-forward per Q-Former layer, and the ITG head (tied to the word embeddings)."""

    def __init__(self, spec: specs.QFormerText, connector: specs.QFormerConnector, vocab_size: int):
        super().__init__()
        dim = connector.hidden_size
        self.hidden_size, self.heads, self.max_length = dim, connector.heads, spec.max_length
        self.words = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.words.weight, std=0.02)  # BERT's: the tied head's logits start near uniform
        self.positions = nn.Parameter(torch.randn(spec.max_length + 1, dim) * 0.02)
        self.starts = nn.Parameter(torch.randn(2, dim) * 0.02)
        self.embed_norm = nn.LayerNorm(dim)
        self.ffs = nn.ModuleList(FeedForward(dim) for _ in range(connector.layers))
        self.head_norm = nn.LayerNorm(dim)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))

    def embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """[B, L + 1, H]: the start token ([CLS] or [DEC]), then the ids, with positions."""
        if ids.shape[1] > self.max_length:
            raise ValueError(f"{ids.shape[1]} text tokens exceed the Q-Former's max_length {self.max_length}")
        first = self.starts[start].expand(ids.shape[0], 1, -1)
        tokens = torch.cat([first, self.words(ids)], dim=1)
        return self.embed_norm(tokens + self.positions[: tokens.shape[1]])

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return F.linear(self.head_norm(states), self.words.weight, self.head_bias)


def with_start(mask: torch.Tensor) -> torch.Tensor:
    """A caption's mask with the start token's position in front."""
    return F.pad(mask, (1, 0), value=1)


def generation_targets(ids: torch.Tensor, mask: torch.Tensor, eos: int) -> torch.Tensor:
    """[B, L + 1]: what each position of [DEC] + ids predicts: the next id, <eos> after the last, then IGNORE."""
    lengths = mask.sum(dim=1, keepdim=True)
    order = torch.arange(ids.shape[1] + 1, device=ids.device)
    padded = F.pad(ids, (0, 1), value=eos)
    targets = torch.where(order < lengths, padded, torch.full_like(padded, eos))
    return targets.masked_fill(order > lengths, IGNORE)


def itg_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The lm objective's loss (per caption, then averaged) of logits [B, T, V] whose position t
    predicts targets[:, t] (`generation_targets`)."""
    return lm_loss(F.pad(logits, (0, 0, 0, 1)), F.pad(targets, (1, 0), value=IGNORE))


def text_parts(spec: specs.ModelSpec, vocab_size: int) -> tuple[QFormerTextBranch, nn.ModuleDict]:
    """The model's text part (the Q-Former's text branch) and its heads: the ITC projections of the
    query and [CLS] outputs into the shared space with the temperature, and the ITM classifier."""
    width = spec.connector.hidden_size
    heads = nn.ModuleDict({"contrastive": ContrastiveHead(width, width, spec.embed_dim), "match": nn.Linear(width, 2)})
    return QFormerTextBranch(spec.text, spec.connector, vocab_size), heads
