"""Training data: samples -> tensors, deterministic batches.

Stages read a samples artifact through `vlmflow.samples.build_index` (every shard's sha256
checked once, each sample's image and JSON members located in its tar), so workers read any
sample with one seek: the order of samples is then a pure function of (seed, epoch) and a
resumed run continues at exactly the batch where it stopped.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image
from tokenizers import Tokenizer

from vlmflow.chat import ChatFormat, ChatTokens, Rendered, stop_text
from vlmflow.grounding import refer_items
from vlmflow.models.objectives import IGNORE, pad_rows
from vlmflow.prompts import CHOICE_TEMPLATE, choice_items, choice_prompt
from vlmflow.samples import read_member

FORMAT_COLUMN = {
    "caption": "n_captions", "qa": "n_qa", "conversations": "n_turns", "choice": "n_choices", "refer": "n_refs",
}  # fmt: skip


@dataclass(frozen=True)
class ImageSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, config: dict) -> ImageSpec:
        """From `image_spec()`'s dict or its JSON copy in a model folder."""
        return cls(int(config["size"]), tuple(config["mean"]), tuple(config["std"]))


def preprocess(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode, RGB, bicubic resize to a square, scale to [0, 1], normalise; CHW float32."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB").resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.array(spec.mean, dtype=np.float32)) / np.array(spec.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class TooLong(ValueError):
    """A sample's text is longer than the stage's max_text_tokens (overflow: quarantine)."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"too-long:{tokens} tokens > {limit}")
        self.tokens, self.limit = tokens, limit


def own_format(tokenizer: Tokenizer, special: dict[str, int]) -> ChatFormat:
    """The `vlmflow` template with the tokens of a tokenizer's special ids (a model folder of before
    chat templates, or a codec built without one)."""
    name = {role: tokenizer.id_to_token(special[role]) for role in ("<bos>", "<eos>", "<image>") if role in special}
    return ChatFormat("vlmflow", ChatTokens(eos=name["<eos>"], bos=name.get("<bos>"), image=name["<image>"]))


class TextCodec:
    """Token ids and labels of conversations in a chat template (`vlmflow.chat`); only the
    assistant turns are learned, the image token becomes `image_tokens` image positions.

    A conversation of more than `max_text` text tokens (every token but the image's) raises
    `TooLong` with `overflow: quarantine`, and is cut at the limit with `overflow: truncate`;
    `max_text` None: no limit. Prompts for generation are never cut."""

    def __init__(
        self,
        tokenizer_file: Path,
        special: dict[str, int],
        image_tokens: int,
        max_text: int | None,
        chat: ChatFormat | None = None,
        overflow: str = "quarantine",
    ):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.special, self.image_tokens, self.max_text, self.overflow = special, image_tokens, max_text, overflow
        self.format = chat or own_format(self.tokenizer, special)
        if missing := self.format.missing(self.tokenizer):
            raise ValueError(f"template {self.format.template}: the tokenizer lacks the tokens {', '.join(missing)}")
        self.image_id = special["<image>"]
        stop = self.ids(stop_text(self.format.template, self.format.tokens))
        self.stop_id = stop[0] if len(stop) == 1 else special["<eos>"]

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, rendered: Rendered) -> tuple[list[int], list[int]]:
        """(ids, labels) of a rendered conversation: one tokenisation of its whole text (as a
        processor does); a token is learned when its characters overlap an assistant span."""
        encoding = self.tokenizer.encode(rendered.text, add_special_tokens=False)
        ids, labels = ([self.special["<bos>"]], [IGNORE]) if rendered.bos else ([], [])
        for token, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token == self.image_id:
                ids, labels = ids + [token] * self.image_tokens, labels + [IGNORE] * self.image_tokens
                continue
            learned = any(start < stop and end > begin for begin, stop in rendered.learned)
            ids.append(token)
            labels.append(token if learned else IGNORE)
        return ids, labels

    def text_tokens(self, ids: list[int]) -> int:
        return sum(token != self.image_id for token in ids)

    def chat(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a training conversation, within max_text text tokens."""
        ids, labels = self.encode(self.format.render(turns))
        count = self.text_tokens(ids)
        if self.max_text is None or count <= self.max_text:
            return ids, labels
        if self.overflow != "truncate":
            raise TooLong(count, self.max_text)
        cut = len(ids) - (count - self.max_text)  # the text's end (the image comes before it)
        if self.text_tokens(ids[:cut]) != self.max_text:
            raise TooLong(count, self.max_text)  # the text before the image alone is too long
        return ids[:cut], labels[:cut]

    def prompt(self, question: str) -> list[int]:
        """A one-turn prompt ending where the assistant's answer starts, for generation."""
        ids, _ = self.encode(self.format.render([{"role": "user", "content": question}], generation=True))
        return ids


def sample_turns(record: dict, fmt: str, prompt: str, epoch: int, template: str = CHOICE_TEMPLATE) -> list[dict] | None:
    """The conversation a sample trains on, or None when it has nothing for this format.
    `prompt` is the caption format's user turn, `template` the choice format's (as evaluation asks)."""
    if fmt == "caption":
        caption = pick_caption(record, epoch)
        return (
            None
            if caption is None
            else [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]
        )
    if fmt == "qa":
        # One question per sample and epoch, a different one each epoch: asked alone, as
        # evaluation asks it, so the answer must come from the image, not from earlier turns.
        pairs = record.get("qa") or []
        if not pairs:
            return None
        qa = pairs[_pick(record, epoch, len(pairs))]
        return [{"role": "user", "content": qa["question"]}, {"role": "assistant", "content": qa["answer"]}]
    if fmt == "choice":
        # One multiple-choice item per sample and epoch, asked with the template evaluation uses:
        # the answer is the option's letter.
        items = choice_items(record)
        if not items:
            return None
        question, options, answer = items[_pick(record, epoch, len(items))]
        return [{"role": "user", "content": choice_prompt(template, question, options)},
                {"role": "assistant", "content": answer}]  # fmt: skip
    if fmt == "refer":
        # One uniquely named object per sample and epoch, answered with its box (MiniGPT-v2's [refer] task).
        refer = refer_items(record)
        if not refer:
            return None
        question, answer, _ = refer[_pick(record, epoch, len(refer))]
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    turns = [t for t in record.get("conversations") or [] if t.get("role") in ("user", "assistant")]
    return turns or None


def _pick(record: dict, epoch: int, n: int) -> int:
    """Which of a sample's n items it trains on in `epoch` (a pure function of key and epoch)."""
    rng = np.random.default_rng([epoch, zlib.crc32(str(record.get("key", "")).encode())])
    return int(rng.integers(n))


def pick_caption(record: dict, epoch: int) -> str | None:
    captions = [c for c in record.get("captions") or [] if c]
    return captions[epoch % len(captions)] if captions else None


def usable(fmt: str) -> pl.Expr:
    """Rows that have something to train on in this format (a caption, QA pairs, assistant turns)."""
    return pl.col(FORMAT_COLUMN[fmt]) > 0


def split_rows(index: pl.DataFrame, split: str, fmt: str) -> pl.DataFrame:
    """Index rows of one split with something to train on in `fmt`, tagged with the format."""
    return index.filter((pl.col("split") == split) & usable(fmt)).with_columns(format=pl.lit(fmt))


class ShardSamples:
    """Samples read by position from the indexed shards; each row carries its format."""

    def __init__(self, rows: pl.DataFrame, store_root: Path):
        self.rows = rows.to_dicts()
        self.store_root = store_root

    @classmethod
    def split(cls, index: pl.DataFrame, store_root: Path, split: str, fmt: str) -> ShardSamples:
        return cls(split_rows(index, split, fmt), store_root)

    def __len__(self) -> int:
        return len(self.rows)

    def format(self, i: int) -> str:
        return self.rows[i]["format"]

    def read(self, i: int) -> tuple[str, bytes, dict]:
        row = self.rows[i]
        path = self.store_root / row["shard"]
        image = read_member(path, row["image_offset"], row["image_size"])
        record = json.loads(read_member(path, row["json_offset"], row["json_size"]))
        return row["key"], image, record


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7919]).permutation(n)


def worker_micro_batches(
    order: np.ndarray, step_in_epoch: int, batch_size: int, micro: int, rank: int, world: int
) -> list[np.ndarray]:
    """This worker's micro-batches of one global batch: rows rank, rank+world, … split by `micro`."""
    batch = order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]
    mine = batch[rank::world]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def mirrored(seed: int, epoch: int, position: int, probability: float) -> bool:
    """Whether sample `position` is flipped left to right in `epoch` (the same on every worker and retry)."""
    return bool(np.random.default_rng([seed, epoch, position, 104729]).random() < probability)


def offset(seed: int, epoch: int, position: int, limit: int) -> tuple[int, int]:
    """(dx, dy) in [-limit, limit] that sample `position` is moved by in `epoch` (the same on every
    worker and retry)."""
    dx, dy = np.random.default_rng([seed, epoch, position, 130363]).integers(-limit, limit + 1, size=2)
    return int(dx), int(dy)


def translate(array: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """A CHW image moved right by dx and down by dy pixels; the uncovered border repeats the edge."""
    if dx == dy == 0:
        return array
    pad = max(abs(dx), abs(dy))
    padded = np.pad(array, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    height, width = array.shape[1:]
    return np.ascontiguousarray(padded[:, pad - dy : pad - dy + height, pad - dx : pad - dx + width])


class Collator:
    """Turns positions into a padded batch for the model (pixels, chat ids/labels in each row's
    format, caption ids)."""

    def __init__(
        self,
        samples: ShardSamples,
        image: ImageSpec,
        codec: TextCodec,
        prompt: str,
        text_length: int | None,
        hflip: float = 0.0,
        seed: int = 0,
        shift: int = 0,
        choice_template: str = CHOICE_TEMPLATE,
    ):
        self.samples, self.image, self.codec = samples, image, codec
        self.prompt, self.text_length, self.choice_template = prompt, text_length, choice_template
        self.hflip, self.shift, self.seed = hflip, shift, seed
        self.flipped = 0  # images mirrored so far
        self.moved = 0  # pixels the images were moved so far, each by max(|dx|, |dy|)

    def __call__(self, positions: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        pixels, chats, captions = [], [], []
        for i in positions:
            _key, image, record = self.samples.read(int(i))
            array = preprocess(image, self.image)
            if self.hflip and mirrored(self.seed, epoch, int(i), self.hflip):
                array = np.ascontiguousarray(array[:, :, ::-1])
                self.flipped += 1
            if self.shift:
                dx, dy = offset(self.seed, epoch, int(i), self.shift)
                array = translate(array, dx, dy)
                self.moved += max(abs(dx), abs(dy))
            pixels.append(array)
            turns = sample_turns(record, self.samples.format(int(i)), self.prompt, epoch, self.choice_template)
            chats.append(self.codec.chat(turns or []))
            caption = pick_caption(record, epoch) or ""
            captions.append(self.codec.ids(caption)[: self.text_length or 1])
        pad = self.codec.special["<pad>"]
        batch = {"pixels": torch.from_numpy(np.stack(pixels))}
        batch["input_ids"], batch["attention_mask"] = pad_rows([c[0] for c in chats], pad)
        batch["labels"], _ = pad_rows([c[1] for c in chats], IGNORE)
        batch["text_ids"], batch["text_mask"] = pad_rows([c or [pad] for c in captions], pad)
        return batch
