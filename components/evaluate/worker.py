"""The model side of evaluation: one object holds a trained model folder, its tokenizer and
image preprocessing, and answers batches (generate, answer likelihoods, embeddings).

It is the Ray actor class of the evaluate stage (one model load per actor) and is used as a
plain object by tests and by the per-sample baseline of `benchmarks/eval.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlmflow.chat import ChatFormat
from vlmflow.components.evaluate.generate import Decoding, answer_logprobs, generate
from vlmflow.components.evaluate.shots import few_shot_inputs
from vlmflow.components.train.data import ImageSpec, TextCodec, pad_rows, preprocess
from vlmflow.components.train.interleaved import InterleavedCodec, is_flamingo
from vlmflow.components.train.setup import TOKENIZER_FILE, read_model_folder

MAX_PROMPT_TEXT = 256  # text tokens of a prompt (image tokens come on top)


class EvalWorker:
    def __init__(self, model_folder: str, threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(threads)
        folder = Path(model_folder)
        self.device = torch.device(device)
        self.model, config = read_model_folder(folder)
        self.model.to(self.device).eval()
        self.image = ImageSpec.of(config["image"])
        self.special = config["vocab"]["special"]
        chat = ChatFormat.of(config["chat"]) if config.get("chat") else None  # the template the model learned
        tokens = self.model.num_image_tokens
        self.codec = TextCodec(folder / TOKENIZER_FILE, self.special, tokens, MAX_PROMPT_TEXT, chat)
        if is_flamingo(self.model.spec):  # interleaved samples and few-shot prompts
            self.codec = InterleavedCodec(folder / TOKENIZER_FILE, self.special, MAX_PROMPT_TEXT)
        self.stop = self.codec.stop_id  # the end of an assistant turn

    def run(self, job: tuple[str, object]) -> object:
        """One job of the actor pool: (method name, its argument)."""
        op, payload = job
        if op not in ("generate", "answer_logprobs", "embed_images", "embed_texts", "match"):
            raise ValueError(f"unknown evaluation job {op!r}")
        return getattr(self, op)(payload)

    def pixels(self, images: list[bytes]) -> torch.Tensor:
        return torch.from_numpy(np.stack([preprocess(data, self.image) for data in images])).to(self.device)

    def generate(self, batch: dict) -> list[str]:
        """batch: {"images": [bytes], "prompts": [str], "decoding": Decoding as a dict}."""
        options = Decoding(**batch["decoding"])
        if batch.get("shots"):  # few-shot: in-context examples before each question (shots.py)
            prompts, pixels = few_shot_inputs(self.codec, batch["prompts"], batch["images"], batch["shots"], self.image)
        else:
            prompts, pixels = [self.codec.prompt(p) for p in batch["prompts"]], self.pixels(batch["images"])
        ids = generate(self.model, prompts, pixels.to(self.device), self.stop, options)
        return [self.codec.tokenizer.decode(row) for row in ids]

    def answer_logprobs(self, batch: dict) -> list[list[float]]:
        """batch: {"images": [bytes], "prompts": [str], "answers": [str]}: for every image, the log
        probability of each answer (the same answers for all images), summed over its tokens."""
        pixels = self.pixels(batch["images"])
        answers = [self.codec.ids(a) for a in batch["answers"]]
        prompts = [self.codec.prompt(p) for p in batch["prompts"]]
        k = len(answers)
        images = [i for i in range(len(prompts)) for _ in answers]
        rows = [(prompt, answer) for prompt in prompts for answer in answers]
        scores = answer_logprobs(self.model, [r[0] for r in rows], [r[1] for r in rows], pixels[images])
        return [scores[i * k : (i + 1) * k] for i in range(len(prompts))]

    @torch.no_grad()
    def embed_images(self, images: list[bytes]) -> np.ndarray:
        _, embedding = self.model.embed_image(self.pixels(images))
        return torch.nn.functional.normalize(embedding, dim=-1).cpu().numpy()

    def text_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of texts cut to the text tower's max_length, on the device."""
        length = self.model.spec.text.max_length
        ids, mask = pad_rows(
            [self.codec.ids(t)[:length] or [self.special["<pad>"]] for t in texts], self.special["<pad>"]
        )
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        _, embedding = self.model.embed_text(*self.text_ids(texts))
        return torch.nn.functional.normalize(embedding, dim=-1).cpu().numpy()

    @torch.no_grad()
    def match(self, batch: dict) -> list[float]:
        """batch: {"images": [bytes], "texts": [str]}, one text per image: the ITM head's P(match) of each pair."""
        features, _ = self.model.embed_image(self.pixels(batch["images"]))
        ids, mask = self.text_ids(batch["texts"])
        states, _ = self.model.embed_text(ids, mask)
        logits = self.model.match_logits(states, mask, features)
        return torch.softmax(logits.float(), dim=-1)[:, 1].cpu().tolist()

    def can_embed(self) -> bool:
        return self.model.text is not None
