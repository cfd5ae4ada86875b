"""Hugging Face BLIP folders as CapFilt's captioner and filter: accepted by the spec for the role
they can play, scored exactly as transformers' own forward pass scores them, captions seeded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BlipForImageTextRetrieval

from tests.hf_blip import write_blip
from vlmflow.components.capfilt.hf import HfBlip
from vlmflow.components.evaluate.generate import Decoding
from vlmflow.components.sources.synthetic import make_row
from vlmflow.errors import SpecError
from vlmflow.specs import load_recipe
from vlmflow.specs.data import SyntheticShapesSource

BLIP = Path(__file__).resolve().parents[2] / "specs" / "recipes" / "blip-tiny.yaml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "captioner": write_blip(root / "captioning", "BlipForConditionalGeneration"),
        "filter": write_blip(root / "retrieval", "BlipForImageTextRetrieval"),
    }


@pytest.fixture(scope="module")
def rows() -> list:
    source = SyntheticShapesSource(kind="synthetic-shapes", count=8, image_size=32, max_objects=2)
    return [make_row(source, 0, i) for i in range(4)]


def _load(overrides: list[str]):
    return load_recipe(
        BLIP, [*overrides, "runtime.allow_outside_paths=true", "capfilt.rounds=1", "capfilt.round_steps=null"]
    )


def test_blip_folders_are_accepted_for_the_role_they_can_play(folders):
    recipe = _load([f"capfilt.captioner.model={{path: {folders['captioner']}}}",
                    f"capfilt.filter.model={{path: {folders['filter']}}}"])  # fmt: skip
    assert recipe.capfilt.captioner.model.parts() == {"language"}
    assert recipe.capfilt.filter.model.parts() == {"text"}
    swapped = [f"capfilt.captioner.model={{path: {folders['filter']}}}",
               f"capfilt.filter.model={{path: {folders['captioner']}}}"]  # fmt: skip
    with pytest.raises(SpecError) as info:
        _load(swapped)
    found = [str(p) for p in info.value.problems]
    assert any(
        ": capfilt.captioner.model.path: " in p
        and "is a BlipForImageTextRetrieval; the captioner needs a BlipForConditionalGeneration" in p
        for p in found
    ), found
    assert any(": capfilt.filter.model.path: " in p and "the filter needs a BlipForImageTextRetrieval" in p
               for p in found), found  # fmt: skip


def test_scores_equal_transformers_forward_pass(folders, rows):
    blip = HfBlip(folders["filter"])
    texts = [[r.captions[0], rows[(i + 1) % len(rows)].captions[0]] for i, r in enumerate(rows)]
    itm, itc = blip.score([r.image for r in rows], texts)
    model = BlipForImageTextRetrieval.from_pretrained(folders["filter"]).eval()
    expected_itm, expected_itc = [], []
    with torch.no_grad():
        for row, group in zip(rows, texts, strict=True):
            pixels = blip.images(images=[Image.open(io.BytesIO(row.image)).convert("RGB")], return_tensors="pt")
            for text in group:
                tokens = blip.tokenizer([text], return_tensors="pt")
                inputs = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
                matched = model(**inputs, pixel_values=pixels["pixel_values"])
                expected_itm.append(torch.softmax(matched.itm_score, -1)[0, 1].item())
                cosine = model(**inputs, pixel_values=pixels["pixel_values"], use_itm_head=False)
                expected_itc.append(cosine.itm_score[0, 0].item())
    assert itm == pytest.approx(expected_itm, abs=1e-5)
    assert itc == pytest.approx(expected_itc, abs=1e-5)
    with pytest.raises(ValueError, match="not a BlipForConditionalGeneration"):
        blip.generate([rows[0].image], None, Decoding())


def test_sampled_captions_follow_the_batch_seed_and_a_prompt_is_their_prefix(folders, rows):
    blip = HfBlip(folders["captioner"])
    images = [r.image for r in rows]
    first = blip.generate(images, None, Decoding(strategy="sample", top_p=0.9, max_new_tokens=6, seed=3))
    assert first == blip.generate(images, None, Decoding(strategy="sample", top_p=0.9, max_new_tokens=6, seed=3))
    assert first != blip.generate(images, None, Decoding(strategy="sample", top_p=0.9, max_new_tokens=6, seed=4))
    prefixed = blip.generate(images, "a picture of", Decoding(strategy="greedy", max_new_tokens=4))
    assert all(c.startswith("a picture of") and len(c.split()) > 3 for c in prefixed)
    with pytest.raises(ValueError, match="not a BlipForImageTextRetrieval"):
        blip.score(images, [["a red circle"]] * len(images))


@pytest.mark.gpu
def test_scores_and_greedy_captions_on_cuda_equal_the_cpu(folders, rows):
    images = [r.image for r in rows]
    texts = [[r.captions[0]] for r in rows]
    on_cpu, on_gpu = HfBlip(folders["filter"]), HfBlip(folders["filter"], device="cuda")
    for cpu, gpu in zip(on_cpu.score(images, texts), on_gpu.score(images, texts), strict=True):
        assert gpu == pytest.approx(cpu, abs=1e-4)
    greedy = Decoding(strategy="greedy", max_new_tokens=6)
    captioners = HfBlip(folders["captioner"]), HfBlip(folders["captioner"], device="cuda")
    assert captioners[0].generate(images, None, greedy) == captioners[1].generate(images, None, greedy)
