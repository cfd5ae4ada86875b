"""End-of-stage checks on held-out samples: did the stage learn something?

Contrastive stages: image->text and text->image Recall@1 against chance (a retrieved
caption counts when its text equals the true one, since synthetic captions repeat).
Matching: ITM accuracy on true pairs and pairs with a different caption (chance 0.5).
Language stages: greedy answers to the held-out VQA questions (batched, as the evaluate
stage generates), exact match, against the majority answer per question (the best a model
blind to the image can do).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from vlmflow.components.evaluate.generate import Decoding, generate
from vlmflow.components.train.data import Collator, ImageSpec, ShardSamples, TextCodec, pick_caption, preprocess
from vlmflow.models.objectives import contrastive_logits
from vlmflow.models.vlm import VLM

BATCH = 64


def held_out(samples: ShardSamples, limit: int) -> list[int]:
    return list(range(min(limit, len(samples))))


@torch.no_grad()
def contrastive_metrics(model: VLM, collate: Collator, positions: list[int], with_itm: bool) -> dict[str, float]:
    images, texts, captions, features, states, masks = [], [], [], [], [], []
    for start in range(0, len(positions), 32):
        batch = collate(np.array(positions[start : start + 32]), epoch=0)
        feats, image = model.embed_image(batch["pixels"])
        hidden, text = model.embed_text(batch["text_ids"], batch["text_mask"])
        images.append(image)
        texts.append(text)
        features.append(feats)
        states.append(hidden)
        masks.append(batch["text_mask"])
        captions += [
            tuple(row[m.bool()].tolist()) for row, m in zip(batch["text_ids"], batch["text_mask"], strict=True)
        ]
    similarity = contrastive_logits(torch.cat(images), torch.cat(texts), torch.tensor(0.0))
    same = np.array([[a == b for b in captions] for a in captions])
    i2t = same[np.arange(len(captions)), similarity.argmax(dim=1).numpy()].mean()
    t2i = same[similarity.argmax(dim=0).numpy(), np.arange(len(captions))].mean()
    chance = float(same.mean())  # identical captions count as right: chance is their share, both ways
    metrics = {"eval_i2t_r1": float(i2t), "eval_t2i_r1": float(t2i)}
    metrics |= {"eval_i2t_r1_chance": chance, "eval_t2i_r1_chance": chance}
    if with_itm:
        metrics.update(_itm_metrics(model, features, states, masks, same))
    return metrics


def _itm_metrics(model: VLM, features: list, states: list, masks: list, same: np.ndarray) -> dict[str, float]:
    feats, hidden, mask = torch.cat(features), torch.cat(states), torch.cat(masks)
    n = len(feats)
    shift = next((s for s in range(1, n) if not same[np.arange(n), (np.arange(n) + s) % n].any()), None)
    if shift is None:
        return {}
    wrong = (np.arange(n) + shift) % n
    positive = model.match_logits(hidden, mask, feats).argmax(dim=1) == 1
    negative = model.match_logits(hidden[wrong], mask[wrong], feats).argmax(dim=1) == 0
    return {"eval_itm_accuracy": float(torch.cat([positive, negative]).float().mean()), "eval_itm_accuracy_chance": 0.5}


@torch.no_grad()
def greedy(model: VLM, ids: list[int], pixels: torch.Tensor, eos: int, max_new: int = 8) -> list[int]:
    out: list[int] = []
    for _ in range(max_new):
        tensor = torch.tensor([ids + out])
        logits = model.lm_logits(tensor, torch.ones_like(tensor), pixels)[0, -1]
        logits[model.vocab.image_id] = float("-inf")  # an image placeholder is never text
        token = int(logits.argmax())
        if token == eos:
            break
        out.append(token)
    return out


def vqa_metrics(
    model: VLM, samples: ShardSamples, positions: list[int], codec: TextCodec, image: ImageSpec, limit: int
) -> dict:
    asked: list[tuple[str, str, np.ndarray]] = []  # question, truth, pixels
    for i in positions:
        _, data, record = samples.read(i)
        pixels = preprocess(data, image)
        asked += [(qa["question"], normalise(qa["answer"]), pixels) for qa in record.get("qa") or []]
        if len(asked) >= limit:
            break
    predicted = answer(model, codec, [codec.prompt(q) for q, _, _ in asked], [p for _, _, p in asked], 12)
    answers = [(q, truth, normalise(p)) for (q, truth, _), p in zip(asked, predicted, strict=True)]
    if not answers:
        return {}
    by_question: dict[str, Counter] = defaultdict(Counter)
    for question, truth, _ in answers:
        by_question[question][truth] += 1
    majority = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    metrics = {"eval_vqa_questions": float(len(answers))}
    for name, keep in (("", lambda q: True), ("_color", lambda q: q.startswith("What color"))):
        chosen = [a for a in answers if keep(a[0])]
        if chosen:
            metrics[f"eval_vqa_accuracy{name}"] = sum(t == p for _, t, p in chosen) / len(chosen)
            # sentence answers ("The circle is red.") from conversation-trained models
            metrics[f"eval_vqa_contains{name}"] = sum(f" {t} " in f" {p} " for _, t, p in chosen) / len(chosen)
            metrics[f"eval_vqa_majority{name}"] = sum(t == majority[q] for q, t, _ in chosen) / len(chosen)
    return metrics


def caption_metrics(
    model: VLM, samples: ShardSamples, positions: list[int], codec: TextCodec, image: ImageSpec, prompt: str
) -> dict:
    records = [samples.read(i) for i in positions]
    pixels = [preprocess(data, image) for _, data, _ in records]
    predicted = answer(model, codec, [codec.prompt(prompt)] * len(records), pixels, 24)
    truths = [(record.get("truth") or {}).get("caption") or pick_caption(record, 0) or "" for _, _, record in records]
    exact = sum(normalise(p) == normalise(t) for p, t in zip(predicted, truths, strict=True))
    return {"eval_caption_exact": exact / len(positions)} if positions else {}


def answer(model: VLM, codec: TextCodec, prompts: list[list[int]], pixels: list[np.ndarray], max_new: int) -> list[str]:
    """Greedy answers, generated in batches (left-padded, KV cache; as the evaluate stage does)."""
    out: list[str] = []
    for start in range(0, len(prompts), BATCH):
        images = torch.from_numpy(np.stack(pixels[start : start + BATCH]))
        ids = generate(model, prompts[start : start + BATCH], images, codec.stop_id, Decoding("greedy", max_new))
        out += [codec.tokenizer.decode(row) for row in ids]
    return out


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split())
