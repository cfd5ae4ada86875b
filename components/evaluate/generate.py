"""Batched decoding and answer likelihoods for a VLM: prompts left-padded, one forward pass over
the prompts, then one token per step from the language model's KV cache.

Left padding keeps every row's last prompt token in the last column, so the next token of all
rows is read from one position; position ids count real tokens only, so a padded row computes
what it would alone. The `<image>` placeholder id is never generated (it is not text).
Strategies: greedy, sampling (temperature, nucleus top-p; seeded) and beam search (per row,
length-normalised log-probability as the final ranking, as HF's default length_penalty=1).
Everything runs on the model's device; sampling draws on the CPU from the seed, so a sampled
caption does not depend on the device beyond the logits' own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmflow.models.vlm import VLM


@dataclass(frozen=True)
class Decoding:
    strategy: str = "greedy"  # greedy | sample | beam
    max_new_tokens: int = 16
    num_beams: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], mask [B, L]) with every row right-aligned; padding (mask 0) on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


@torch.no_grad()
def generate(
    model: VLM, prompts: list[list[int]], pixels: torch.Tensor, eos: int, options: Decoding
) -> list[list[int]]:
    """New token ids per prompt (without the eos), `pixels` [B, 3, H, W] one image per prompt."""
    if not prompts:
        return []
    if options.strategy == "beam" and options.num_beams > 1:
        return [_beam(model, p, pixels[i : i + 1], eos, options) for i, p in enumerate(prompts)]
    device = pixels.device
    ids, mask = (t.to(device) for t in left_pad(prompts, model.vocab.pad_id))
    generator = torch.Generator().manual_seed(options.seed)
    out = model.language(
        inputs_embeds=model.input_embeddings(ids, pixels),
        attention_mask=mask,
        position_ids=_positions(mask),
        use_cache=True,
    )
    produced = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(options.max_new_tokens):
        logits = out.logits[:, -1].float()
        logits[:, model.vocab.image_id] = float("-inf")
        token = _pick(logits, options, generator).to(device)
        picked = token.tolist()
        for row in torch.nonzero(~done).flatten().tolist():
            if picked[row] == eos:
                done[row] = True
            else:
                produced[row].append(picked[row])
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=device)], dim=1)
        out = model.language(
            inputs_embeds=model.language.get_input_embeddings()(token.unsqueeze(1)),
            attention_mask=mask,
            position_ids=_positions(mask)[:, -1:],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return produced


def _pick(logits: torch.Tensor, options: Decoding, generator: torch.Generator) -> torch.Tensor:
    if options.strategy != "sample":
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.cpu() / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > options.top_p  # keep the first token always
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _beam(model: VLM, prompt: list[int], pixels: torch.Tensor, eos: int, options: Decoding) -> list[int]:
    """Beam search for one prompt: `num_beams` rows share the cache, reordered after every step."""
    beams, device = options.num_beams, pixels.device
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    out = model.language(inputs_embeds=model.input_embeddings(ids, pixels), attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(beams)
    logits = out.logits[:, -1].repeat(beams, 1)
    scores = torch.tensor([0.0] + [float("-inf")] * (beams - 1), device=device)  # all beams start as one
    alive: list[list[int]] = [[] for _ in range(beams)]
    finished: list[tuple[float, list[int]]] = []
    for step in range(options.max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp[:, model.vocab.image_id] = float("-inf")
        total = (scores.unsqueeze(1) + logp).flatten()
        top_scores, top = total.topk(2 * beams)
        vocab = logp.shape[1]
        keep_rows, keep_tokens, keep_scores = [], [], []
        for score, flat in zip(top_scores.tolist(), top.tolist(), strict=True):
            row, token = divmod(flat, vocab)
            if token == eos:
                finished.append((score / (len(alive[row]) + 1), alive[row]))
            else:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_scores.append(score)
            if len(keep_rows) == beams:
                break
        best_alive = max(keep_scores) / (step + 1) if keep_scores else float("-inf")
        if len(finished) >= beams and max(s for s, _ in finished) >= best_alive:
            break
        alive = [alive[r] + [t] for r, t in zip(keep_rows, keep_tokens, strict=True)]
        scores = torch.tensor(keep_scores, device=device)
        cache.reorder_cache(torch.tensor(keep_rows, device=device))
        mask = torch.ones(beams, len(prompt) + step + 1, dtype=torch.long, device=device)
        tokens = torch.tensor(keep_tokens, device=device).unsqueeze(1)
        out = model.language(
            inputs_embeds=model.language.get_input_embeddings()(tokens),
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1]
    finished += [(float(s) / max(len(a), 1), a) for s, a in zip(scores.tolist(), alive, strict=True)]
    return max(finished, key=lambda f: f[0])[1]


@torch.no_grad()
def answer_logprobs(
    model: VLM, prompts: list[list[int]], answers: list[list[int]], pixels: torch.Tensor
) -> list[float]:
    """Sum of log p(answer tokens | prompt, image) per row (right-padded; pixels one image per row)."""
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.vocab.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    ids, mask = ids.to(pixels.device), mask.to(pixels.device)
    logits = model.language(inputs_embeds=model.input_embeddings(ids, pixels), attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    totals = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        start = len(prompt) - 1  # logits at position t predict token t + 1
        totals.append(float(logp[i, start : start + len(answer)].sum()))
    return totals
