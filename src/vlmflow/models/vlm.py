"""The assembled VLM: named parts (vision, connector, language, text, heads) and its losses.

Image tokens enter the language model the way LLaVA (and its HF port) does: the prompt
holds one `<image>` placeholder id per image token and their embeddings are replaced, in
order, by the connector's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from vlmflow.models import objectives as obj
from vlmflow.models.connectors import build_connector
from vlmflow.models.flamingo import Flamingo
from vlmflow.models.language import build_language
from vlmflow.models.packed import block_causal_mask, packed_lm_loss, segment_positions
from vlmflow.models.qformer import CLS, DEC, generation_targets, itg_loss, text_parts, with_start
from vlmflow.models.text import build_text
from vlmflow.models.vision import build_vision
from vlmflow.specs.model import ModelSpec, QFormerText

PARTS = ("vision", "connector", "language", "text", "heads")


@dataclass(frozen=True)
class Vocab:
    size: int
    special: dict[str, int]  # "<pad>", "<bos>", "<eos>", "<image>", "<|user|>", "<|assistant|>", ...

    @property
    def image_id(self) -> int:
        return self.special["<image>"]

    @property
    def pad_id(self) -> int:
        return self.special["<pad>"]


class VLM(nn.Module):
    def __init__(self, spec: ModelSpec, vocab: Vocab, load_weights: bool = True):
        super().__init__()
        self.spec, self.vocab = spec, vocab
        self.itm_edited_negatives = 0  # per caption, in the ITM loss; a training stage sets it from its spec
        self.vision = build_vision(spec.vision, load_weights)
        language = spec.language
        self.language = build_language(language, vocab.size, vocab.special, load_weights) if language else None
        self.connector = None
        if spec.connector is not None and self.language is not None:
            width = self.language.get_input_embeddings().embedding_dim
            if spec.connector.kind == "flamingo":  # cross-attends from inside the LM instead of splicing tokens
                self.connector = Flamingo(spec.connector, self.vision.hidden_size, self.language, vocab.image_id)
            else:
                self.connector = build_connector(spec.connector, self.vision.hidden_size, width, self.vision.num_tokens)
        self.qformer_text = isinstance(spec.text, QFormerText)  # BLIP-2: the text is the Q-Former's own branch
        tower = spec.text is not None and not self.qformer_text
        self.text, text_proj = build_text(spec, vocab.size, vocab.pad_id, load_weights) if tower else (None, None)
        self.heads = nn.ModuleDict()
        if self.text is not None:
            self.heads["contrastive"] = obj.ContrastiveHead(
                self.vision.hidden_size, self.text.hidden_size, spec.embed_dim, text_proj
            )
            self.heads["match"] = obj.MatchHead(
                self.vision.hidden_size, self.text.hidden_size, self.text.heads, spec.text.match_layers
            )
        if self.qformer_text:
            self.text, self.heads = text_parts(spec, vocab.size)

    @property
    def num_image_tokens(self) -> int:
        return self.connector.out_tokens if self.connector is not None else 0

    def part(self, name: str) -> nn.Module | None:
        return getattr(self, name)

    # -- image and text embeddings --------------------------------------------------------
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        features, _ = self.vision(pixels)
        return self.connector(features)

    def embed_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, N, D], contrastive embedding [B, E]; the Q-Former's: one per query, [B, Q, E])."""
        features, pooled = self.vision(pixels)
        if self.qformer_text:
            pooled, _ = self.connector.encode(features, None, None, "unimodal")
        return features, self.heads["contrastive"].image_proj(pooled)

    def embed_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states for `match_logits`, contrastive embedding [B, E]). The Q-Former's states are the
        text's input embeddings ([CLS] first), its embedding the [CLS] output with the text alone."""
        if self.qformer_text:
            states = self.text.embed(ids, CLS)
            _, out = self.connector.encode(None, states, with_start(mask), "unimodal", self.text.ffs)
            return states, self.heads["contrastive"].text_proj(out[:, 0])
        states, pooled = self.text(ids, mask)
        return states, self.heads["contrastive"].text_proj(pooled)

    def match_logits(self, states: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] (no match, match) of texts (`embed_text`'s states) and images (their features).
        The Q-Former's: queries and text see each other; the mean over the queries of the head's logits."""
        if not self.qformer_text:
            return self.heads["match"](states, mask, features)
        queries, _ = self.connector.encode(features, states, with_start(mask), "bidirectional", self.text.ffs)
        return self.heads["match"](queries).mean(dim=1)

    # -- language model with spliced image tokens --------------------------------------------
    def input_embeddings(self, input_ids: torch.Tensor, pixels: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Token embeddings with the `<image>` positions replaced, in order, by the image tokens of
        the rows that have them (training, held-out checks and evaluation all splice this way).
        Packed rows hold several samples: `pixels` are then the images of their `<image>` runs, in order."""
        embed = self.language.get_input_embeddings()
        if isinstance(self.connector, Flamingo):  # `<image>` stays a token; pixels [B, C, H, W] or [B, K, C, H, W]
            images = pixels if pixels.dim() == 5 else pixels.unsqueeze(1)
            features, _ = self.vision(images.flatten(0, 1))
            self.connector.condition(input_ids, features.unflatten(0, images.shape[:2]))
            return embed(input_ids)
        is_image = input_ids == self.vocab.image_id
        embeds = embed(input_ids.masked_fill(is_image, self.vocab.pad_id))
        if input_ids.is_meta or is_image.any():  # meta: shapes only (vlmflow plan), assume the image is there
            tokens = self.image_tokens(pixels).to(embeds.dtype)
            if not input_ids.is_meta:
                has_image = is_image.any(dim=1)
                if not packed and not bool(has_image.all()):
                    tokens = tokens[has_image[: len(tokens)]]
                expected = tokens.shape[0] * tokens.shape[1]
                if int(is_image.sum()) != expected:
                    raise ValueError(f"{int(is_image.sum())} <image> positions for {expected} image tokens")
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), tokens)
        return embeds

    def lm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixels: torch.Tensor,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Segment ids (packed rows, `models.packed`): each sample attends to itself only, from position 0."""
        embeds = self.input_embeddings(input_ids, pixels, packed=segments is not None)
        if segments is not None:
            kind = torch.bool if self.language.config._attn_implementation == "sdpa" else embeds.dtype
            mask, positions = block_causal_mask(segments, kind), segment_positions(segments)
            return self.language(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).logits
        # No KV cache: nothing reads it, and a checkpointed layer recomputed in backward would write it twice.
        # Meta (shapes only): HF reads a mask's values to pick the kernel, and without a cache the position ids'
        # values to find packed sequences; there the cache stays (its K/V are what attention saves anyway).
        mask, cache = (None, None) if input_ids.is_meta else (attention_mask, False)
        return self.language(inputs_embeds=embeds, attention_mask=mask, use_cache=cache).logits

    # -- objectives -------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], kinds: list[str]) -> dict[str, torch.Tensor]:
        """The losses of the named objectives (forward goes through DDP/FSDP wrappers)."""
        return self.losses(batch, kinds)

    def losses(self, batch: dict[str, torch.Tensor], kinds: list[str]) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if "lm" in kinds:
            segments = batch.get("segment_ids")  # packed rows (a stage with packing: true)
            logits = self.lm_logits(batch["input_ids"], batch["attention_mask"], batch["pixels"], segments)
            labels = batch["labels"]
            losses["lm"] = obj.lm_loss(logits, labels) if segments is None else packed_lm_loss(logits, labels, segments)
        if {"itc", "siglip", "itm", "itg"} & set(kinds):
            losses.update(self._pair_losses(batch, kinds))
        return losses

    def _pair_losses(self, batch: dict[str, torch.Tensor], kinds: list[str]) -> dict[str, torch.Tensor]:
        features, image = self.embed_image(batch["pixels"])
        losses = {}
        if "itg" in kinds:  # BLIP-2: the caption decoded by the Q-Former's text branch, the queries its prefix
            ids, mask = batch["text_ids"], batch["text_mask"]
            _, out = self.connector.encode(
                features, self.text.embed(ids, DEC), with_start(mask), "causal", self.text.ffs
            )
            losses["itg"] = itg_loss(self.text.logits(out), generation_targets(ids, mask, self.vocab.special["<eos>"]))
        if not {"itc", "siglip", "itm"} & set(kinds):
            return losses
        states, text = self.embed_text(batch["text_ids"], batch["text_mask"])
        head = self.heads["contrastive"]
        all_image, all_text = gather(image), gather(text)
        if "itc" in kinds:
            losses["itc"] = obj.itc_loss(all_image, all_text, head.log_scale)
        if "siglip" in kinds:
            losses["siglip"] = obj.siglip_loss(all_image, all_text, head.log_scale, head.bias)
        if "itm" in kinds:
            losses["itm"] = self._itm(features, image, states, text, batch)
        return losses

    def _itm(self, features, image, states, text, batch) -> torch.Tensor:  # noqa: ANN001
        """Positives, plus one hard negative text per image and one hard negative image per text, drawn
        (as in BLIP) from the softmax of their ITC similarity."""
        mask, ids = batch["text_mask"], batch["text_ids"]
        with torch.no_grad():
            similarity = obj.contrastive_logits(image, text, self.heads["contrastive"].log_scale)
            same = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(dim=-1)
            if similarity.is_meta:  # vlmflow plan: shapes only, and multinomial has no meta kernel
                neg_text, neg_image = obj.hardest_negatives(similarity, same)
            else:  # drawn from the global generator, which the training loop reseeds every step
                neg_text, neg_image = obj.sampled_negatives(similarity, same)
        usable_text = ~same.all(dim=1)  # every text in the batch identical: no negative exists
        head = self.match_logits
        positive = head(states, mask, features)
        wrong_text = head(states[neg_text], mask[neg_text], features)
        wrong_image = head(states, mask, features[neg_image])
        if not usable_text.is_meta:  # meta (vlmflow plan): every row has a negative, the upper bound
            wrong_text, wrong_image = wrong_text[usable_text], wrong_image[usable_text]
        negatives = [wrong_text, wrong_image]
        if self.itm_edited_negatives:
            negatives.append(self._edited_negatives(ids, mask, features, self.itm_edited_negatives))
        logits = torch.cat([positive, *negatives])
        labels = torch.cat(
            [
                torch.ones(len(positive), dtype=torch.long),
                torch.zeros(sum(len(n) for n in negatives), dtype=torch.long),
            ]
        ).to(logits.device)
        return obj.itm_loss(logits, labels)

    def _edited_negatives(self, ids, mask, features, count: int) -> torch.Tensor:  # noqa: ANN001
        """Match logits of each image with `count` one-place edits of its caption (objectives.edited_negatives)."""
        if ids.is_meta:  # vlmflow plan: shapes only; every caption gets `count` edits as wide as the batch
            edited, edited_mask, usable = ids.repeat_interleave(count, 0), mask.repeat_interleave(count, 0), None
        else:
            edited, edited_mask, usable = obj.edited_negatives(ids, mask, count, self.vocab.pad_id)
        states, _ = self.embed_text(edited, edited_mask)
        owner = torch.arange(len(ids), device=features.device).repeat_interleave(count)
        logits = self.match_logits(states, edited_mask, features[owner])
        return logits if usable is None else logits[usable]


def gather(x: torch.Tensor) -> torch.Tensor:
    """All workers' rows, with gradients flowing back to this worker's (contrastive batches span workers)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def count_parameters(model: nn.Module) -> dict[str, int]:
    counts = {"total": 0, "trainable": 0}
    for name in PARTS:
        part = getattr(model, name, None)
        if part is None:
            continue
        params = list(part.parameters())
        counts[f"{name}_total"] = sum(p.numel() for p in params)
        counts[f"{name}_trainable"] = sum(p.numel() for p in params if p.requires_grad)
        counts["total"] += counts[f"{name}_total"]
        counts["trainable"] += counts[f"{name}_trainable"]
    return counts
