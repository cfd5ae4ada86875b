"""Interleaved image-text sequences for Flamingo models (M3W-style).

A sample is `<image>Question: {user} Short answer: {assistant}<eos>` (OpenFlamingo's VQA format;
every format is rendered this way: a caption answers the stage's caption prompt, a conversation
is its turns one after the other). A training sequence is `<bos>` and `images_per_sequence`
consecutive samples of the micro-batch, each with its own image: pixels [B, K, C, H, W], the i-th
`<image>` of a row standing for its i-th image (a short last row's missing images are zeros).
Only the answers and their `<eos>` are learned, as in every other format.

A few-shot prompt is `<bos>`, the in-context examples as samples, then the query's
`<image>Question: {question} Short answer:`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from vlmflow.components.train.data import (
    Collator,
    ImageSpec,
    ShardSamples,
    mirrored,
    offset,
    preprocess,
    sample_turns,
    translate,
)
from vlmflow.models.objectives import IGNORE, pad_rows
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec

QUESTION, ANSWER = "Question: ", " Short answer:"


class InterleavedCodec:
    """Token ids of interleaved samples and few-shot prompts; a Flamingo model's TextCodec."""

    image_tokens = 1  # one `<image>` token per image

    def __init__(self, tokenizer_file: Path, special: dict[str, int], max_text: int):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.special, self.max_text = special, max_text
        self.stop_id = special["<eos>"]  # generation ends with the sample

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def query(self, question: str) -> list[int]:
        """`<image>Question: {question} Short answer:` (question and answer are encoded apart, as in `sample`)."""
        return [self.special["<image>"], *self.ids(QUESTION + question.replace("<image>", "").strip() + ANSWER)]

    def sample(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, labels) of one sample without `<bos>`: its image, then each user turn and its answer;
        at most 1 + max_text tokens."""
        eos, image = self.special["<eos>"], self.special["<image>"]
        ids, labels = [image], [IGNORE]
        question = None
        for turn in turns:
            if turn["role"] == "user":
                question = turn["content"]
            elif turn["role"] == "assistant" and question is not None:
                asked = self.query(question)[1:]
                answer = [*self.ids(" " + turn["content"].strip()), eos]
                ids, labels = ids + asked + answer, labels + [IGNORE] * len(asked) + answer
                question = None
        return ids[: 1 + self.max_text], labels[: 1 + self.max_text]

    def chat(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        """One sample as a whole sequence: `<bos>` + `sample` (what TextCodec.chat is for chat models)."""
        ids, labels = self.sample(turns)
        return [self.special["<bos>"], *ids], [IGNORE, *labels]

    def prompt(self, question: str, shots: list[tuple[str, str]] = ()) -> list[int]:
        """`<bos>`, the in-context examples (question, answer) as samples, then the query; the images
        go in the same order (the shots' first, the query's last)."""
        ids = [self.special["<bos>"]]
        for shot_question, shot_answer in shots:
            turns = [{"role": "user", "content": shot_question}, {"role": "assistant", "content": shot_answer}]
            ids += self.sample(turns)[0]
        return ids + self.query(question)


def is_flamingo(spec: ModelSpec) -> bool:
    """Whether the model reads interleaved samples (connector kind flamingo)."""
    return spec.connector is not None and spec.connector.kind == "flamingo"


class InterleavedCollator(Collator):
    """Positions -> interleaved sequences of `per_sequence` consecutive samples each (Collator's
    augmentations and counters; no caption ids: Flamingo trains the lm objective only)."""

    def __init__(
        self, samples: ShardSamples, image: ImageSpec, codec: InterleavedCodec, stage: TrainStageSpec, seed: int
    ):
        super().__init__(samples, image, codec, stage.prompt, None, stage.hflip, seed, stage.shift,
                         stage.choice_template)  # fmt: skip
        self.per_sequence = stage.images_per_sequence

    def _pixels(self, position: int, data: bytes, epoch: int) -> np.ndarray:
        array = preprocess(data, self.image)
        if self.hflip and mirrored(self.seed, epoch, position, self.hflip):
            array = np.ascontiguousarray(array[:, :, ::-1])
            self.flipped += 1
        if self.shift:
            dx, dy = offset(self.seed, epoch, position, self.shift)
            array = translate(array, dx, dy)
            self.moved += max(abs(dx), abs(dy))
        return array

    def __call__(self, positions: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        k = self.per_sequence
        rows, labels, pixels = [], [], []
        for start in range(0, len(positions), k):
            ids, learned = [self.codec.special["<bos>"]], [IGNORE]
            images = []
            for i in map(int, positions[start : start + k]):
                _key, data, record = self.samples.read(i)
                images.append(self._pixels(i, data, epoch))
                fmt = self.samples.format(i)
                turns = sample_turns(record, fmt, self.prompt, epoch, self.choice_template) or []
                piece, piece_labels = self.codec.sample(turns)
                ids, learned = ids + piece, learned + piece_labels
            images += [np.zeros_like(images[0])] * (k - len(images))
            rows.append(ids)
            labels.append(learned)
            pixels.append(np.stack(images))
        pad = self.codec.special["<pad>"]
        batch = {"pixels": torch.from_numpy(np.stack(pixels))}
        batch["input_ids"], batch["attention_mask"] = pad_rows(rows, pad)
        batch["labels"], _ = pad_rows(labels, IGNORE)
        batch["text_ids"], batch["text_mask"] = pad_rows([[pad]] * len(rows), pad)
        return batch
