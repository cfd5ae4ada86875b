"""The model side of the curation components: one object holds a model folder and embeds batches
of a data artifact's images (read from the store's shards) and captions.

- a Hugging Face CLIP folder: `CLIPModel.get_image_features` / `get_text_features` (the projected
  embeddings), images through the folder's `CLIPImageProcessorPil`, texts through its tokenizer
  (truncated to the text model's positions);
- a vlmflow model folder: its contrastive head's embeddings (`EvalWorker.embed_images` /
  `embed_texts`), which need a text tower.

It is the actor class of `clip-score` and `semdedup` (one model load per actor) and a plain object
in tests. Embeddings are L2-normalised, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmflow.components.curation import is_hf_clip
from vlmflow.images import to_rgb
from vlmflow.samples import read_member


class HfClip:
    def __init__(self, folder: Path, device: torch.device):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        self.device = device
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.processor = CLIPImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def embed_images(self, images: list[bytes]) -> np.ndarray:
        decoded = [to_rgb(Image.open(io.BytesIO(data))) for data in images]
        pixels = self.processor(images=decoded, return_tensors="pt")["pixel_values"].to(self.device)
        return _unit(self.model.get_image_features(pixel_values=pixels).pooler_output)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _unit(self.model.get_text_features(**tokens).pooler_output)


def _unit(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


class Embedder:
    """model_folder: a Hugging Face CLIP folder or a vlmflow model folder with a text tower."""

    def __init__(self, model_folder: str, store_root: str, threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(threads)
        folder, self.root = Path(model_folder), Path(store_root)
        if is_hf_clip(folder):
            self.model = HfClip(folder, torch.device(device))
        else:
            from vlmflow.components.evaluate.worker import EvalWorker

            self.model = EvalWorker(model_folder, threads, device)
            if not self.model.can_embed():
                raise ValueError(
                    f"{folder}: the model has no text tower and contrastive head (train it with an itc or siglip "
                    "objective, or give a Hugging Face CLIP folder)"
                )

    def read(self, where: list | tuple) -> bytes:
        shard, offset, size = where
        return read_member(self.root / shard, int(offset), int(size))

    @torch.no_grad()
    def images(self, batch: list) -> np.ndarray:
        """[N, E] unit embeddings of the images ([shard, offset, size] each)."""
        return self.model.embed_images([self.read(w) for w in batch]).astype(np.float32)

    @torch.no_grad()
    def pairs(self, batch: dict) -> np.ndarray:
        """[N] cosine similarity of each image (batch["images"]) with its text (batch["texts"])."""
        images = self.images(batch["images"])
        texts = self.model.embed_texts(list(batch["texts"])).astype(np.float32)
        return (images * texts).sum(axis=1)
