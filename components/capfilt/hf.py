"""Hugging Face BLIP folders as CapFilt's models (local folders only, nothing downloaded):
`BlipForConditionalGeneration` writes captions, `BlipForImageTextRetrieval` scores pairs with
its ITM head and its ITC projections, as `transformers` computes them.

The folder is what `save_pretrained` writes for the model and its `BlipProcessor`
(config.json, weights, tokenizer files, preprocessor_config.json).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, BlipImageProcessorPil

from vlmflow.components.evaluate.generate import Decoding
from vlmflow.images import to_rgb
from vlmflow.specs.capfilt import HF_BLIP, hf_architecture


class HfBlip:
    """One BLIP model folder: `generate` for a captioning model, `score` for a retrieval model."""

    def __init__(self, folder: str | Path, threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.architecture = hf_architecture(Path(folder))
        if self.architecture is None:
            raise ValueError(f"{folder} is not a BLIP folder ({', '.join(HF_BLIP)})")
        model_class = getattr(transformers, self.architecture)
        self.model = model_class.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.images = BlipImageProcessorPil.from_pretrained(folder, local_files_only=True)

    def pixels(self, images: list[bytes]) -> torch.Tensor:
        decoded = [to_rgb(Image.open(io.BytesIO(data))) for data in images]
        return self.images(images=decoded, return_tensors="pt")["pixel_values"].to(self.device)

    @torch.no_grad()
    def generate(self, images: list[bytes], prompt: str | None, decoding: Decoding) -> list[str]:
        """A caption per image (a conditional prefix when `prompt` is given, as BLIP does)."""
        if self.architecture != "BlipForConditionalGeneration":
            raise ValueError(f"the captioner is a {self.architecture}, not a BlipForConditionalGeneration")
        inputs = {"pixel_values": self.pixels(images)}
        if prompt:
            tokens = self.tokenizer([prompt] * len(images), return_tensors="pt")  # generate drops the [SEP]
            inputs |= {
                "input_ids": tokens["input_ids"].to(self.device),
                "attention_mask": tokens["attention_mask"].to(self.device),
            }
        options: dict = {"max_new_tokens": decoding.max_new_tokens, "num_beams": 1, "do_sample": False}
        if decoding.strategy == "sample":
            options |= {"do_sample": True, "top_p": decoding.top_p, "top_k": 0, "temperature": decoding.temperature}
        elif decoding.strategy == "beam":
            options["num_beams"] = decoding.num_beams
        torch.manual_seed(decoding.seed)  # the batch's seed (CPU and CUDA): a retry samples the same captions
        ids = self.model.generate(**inputs, **options)
        return [" ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def score(self, images: list[bytes], texts: list[list[str]]) -> tuple[list[float], list[float]]:
        """P(match) from the ITM head and the ITC cosine for every text of every image (flat)."""
        if self.architecture != "BlipForImageTextRetrieval":
            raise ValueError(f"the filter is a {self.architecture}, not a BlipForImageTextRetrieval")
        model = self.model
        owner = torch.tensor([i for i, group in enumerate(texts) for _ in group], device=self.device)
        tokens = self.tokenizer([t for group in texts for t in group], padding=True, return_tensors="pt").to(
            self.device
        )
        image_embeds = model.vision_model(pixel_values=self.pixels(images)).last_hidden_state[owner]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        matched = model.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        itm = torch.softmax(model.itm_head(matched[:, 0, :]).float(), dim=-1)[:, 1]
        text = model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image_feat = torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_feat = torch.nn.functional.normalize(model.text_proj(text.last_hidden_state[:, 0, :]), dim=-1)
        return itm.tolist(), (image_feat * text_feat).sum(-1).tolist()
