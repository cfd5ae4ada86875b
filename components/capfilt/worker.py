"""The model side of CapFilt: one object holds a model folder and answers jobs (a batch of
images read from the store's shards): caption them, or score image-text pairs with the ITM
head and the ITC embeddings.

It is the Ray Data actor class of the caption and filter stages (one model load per actor)
and a plain object in tests and in the single-process baseline of `benchmarks/capfilt.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from vlmflow.components.capfilt.hf import HfBlip
from vlmflow.components.evaluate.generate import Decoding
from vlmflow.components.evaluate.worker import EvalWorker
from vlmflow.components.sources.synthetic import describes
from vlmflow.components.train.data import pad_rows
from vlmflow.samples import read_member
from vlmflow.specs.capfilt import hf_architecture


class CapfiltWorker:
    """model_folder: a vlmflow model folder, or a Hugging Face BLIP folder (components/capfilt/hf.py)."""

    def __init__(self, model_folder: str, store_root: str, threads: int = 1, device: str = "cpu"):
        hf = hf_architecture(Path(model_folder)) is not None
        self.worker = HfBlip(model_folder, threads, device) if hf else EvalWorker(model_folder, threads, device)
        self.root = Path(store_root)

    def __call__(self, job: dict) -> dict:
        if job["op"] == "caption":
            return self.caption(job)
        if job["op"] == "score":
            return self.score(job)
        raise ValueError(f"unknown CapFilt job {job['op']!r}")

    def read(self, where: list) -> bytes:
        shard, offset, size = where
        return read_member(self.root / shard, int(offset), int(size))

    def caption(self, job: dict) -> dict:
        """job: images and records ([shard, offset, size] each), prompt, decoding, k. Returns k
        captions per image and, where the record has a scene graph, whether each is true of it."""
        images = [self.read(w) for w in job["images"]]
        decoding = Decoding(**job["decoding"])
        per_draw = []
        for j in range(job["k"]):
            options = asdict(decoding) | {"seed": decoding.seed + 7919 * j}
            if isinstance(self.worker, HfBlip):
                per_draw.append(self.worker.generate(images, job["prompt"], Decoding(**options)))
            else:
                batch = {"images": images, "prompts": [job["prompt"]] * len(images), "decoding": options}
                per_draw.append(self.worker.generate(batch))
        captions = [[" ".join(draw[i].split()) for draw in per_draw] for i in range(len(images))]
        correct = []
        for where, texts in zip(job["records"], captions, strict=True):
            objects = json.loads(self.read(where)).get("objects")
            correct.append([describes(t, objects) for t in texts] if objects else [None] * len(texts))
        return {"captions": captions, "correct": correct}

    @torch.no_grad()
    def score(self, job: dict) -> dict:
        """job: images ([shard, offset, size]) and texts (a list per image). Returns, per image and
        text, P(match) from the ITM head and the cosine similarity of the ITC embeddings."""
        owner = [i for i, texts in enumerate(job["texts"]) for _ in texts]
        flat = [t for texts in job["texts"] for t in texts]
        if not flat:
            return {"itm": [[] for _ in job["texts"]], "itc": [[] for _ in job["texts"]]}
        if isinstance(self.worker, HfBlip):
            itm, itc = self.worker.score([self.read(w) for w in job["images"]], job["texts"])
            return {"itm": _per_image(itm, job["texts"]), "itc": _per_image(itc, job["texts"])}
        model, codec = self.worker.model, self.worker.codec
        if model.text is None:
            raise ValueError("the filter model has no text encoder and matching head (train it with itc/itm)")
        features, image = model.embed_image(self.worker.pixels([self.read(w) for w in job["images"]]))
        pad, length = self.worker.special["<pad>"], model.spec.text.max_length
        ids, mask = pad_rows([codec.ids(t)[:length] or [pad] for t in flat], pad)
        device = self.worker.device
        ids, mask = ids.to(device), mask.to(device)
        states, text = model.embed_text(ids, mask)
        rows = torch.tensor(owner, device=device)
        itm = torch.softmax(model.match_logits(states, mask, features[rows]).float(), dim=-1)[:, 1]
        itc = torch.nn.functional.cosine_similarity(image[rows], text, dim=-1)
        return {"itm": _per_image(itm.tolist(), job["texts"]), "itc": _per_image(itc.tolist(), job["texts"])}


def _per_image(values: list[float], texts: list[list[str]]) -> list[list[float]]:
    out, start = [], 0
    for group in texts:
        out.append(values[start : start + len(group)])
        start += len(group)
    return out
