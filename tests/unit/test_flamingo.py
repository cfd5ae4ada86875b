"""Flamingo: gated cross-attention leaves the frozen LM unchanged at initialisation, each token sees
only the latest image before it, gradients reach the gates, cached generation matches the uncached
model, and interleaved samples / few-shot prompts are laid out as OpenFlamingo lays them out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from vlmflow.components.evaluate.generate import Decoding, generate
from vlmflow.components.train.evaluate import greedy
from vlmflow.components.train.interleaved import InterleavedCodec, is_flamingo
from vlmflow.models.flamingo import Flamingo
from vlmflow.models.language import build_language
from vlmflow.models.objectives import IGNORE
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.specs.model import ModelSpec

SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<image>": 4}
VOCAB = Vocab(64, SPECIAL)
IMAGE = SPECIAL["<image>"]
FLAMINGO = {"kind": "flamingo", "num_latents": 4, "layers": 1, "heads": 4, "cross_attn_every": 1,
            "cross_attn_heads": 2, "cross_attn_head_dim": 8}  # fmt: skip
LLAMA = {"kind": "tiny-llama", "hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64}
VIT = {"kind": "tiny-vit", "image_size": 16, "patch_size": 8, "hidden_size": 16, "layers": 1, "heads": 2}
# <bos> a b <image> c d <image> e f: image 1 at position 3, image 2 at position 6
IDS = torch.tensor([[1, 10, 11, IMAGE, 12, 13, IMAGE, 14, 15]])


def flamingo_model(language: dict | None = None, folder=None, **connector) -> VLM:
    torch.manual_seed(0)
    spec = {"vision": VIT, "connector": {**FLAMINGO, **connector}, "language": language or LLAMA}
    return VLM(ModelSpec.model_validate(spec, context={"spec_dir": folder}), VOCAB).eval()


def open_gates(model: VLM, value: float = 1.0) -> None:
    with torch.no_grad():
        for block in model.connector.blocks:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def bare_copy(model: VLM) -> LlamaForCausalLM:
    """The same language model without the Flamingo hooks."""
    torch.manual_seed(0)
    bare = build_language(model.spec.language, VOCAB.size, SPECIAL)
    bare.load_state_dict(model.language.state_dict())
    return bare.eval()


@pytest.mark.parametrize("every", [1, 2])
def test_at_init_the_lm_computes_exactly_what_it_computed_alone(every):
    model = flamingo_model(cross_attn_every=every)
    assert len(model.connector.blocks) == 2 // every
    assert all(b.attn_gate.item() == 0 and b.ff_gate.item() == 0 for b in model.connector.blocks)
    with torch.no_grad():
        logits = model.lm_logits(IDS, torch.ones_like(IDS), images())
        alone = bare_copy(model)(input_ids=IDS).logits
    assert torch.equal(logits, alone)
    open_gates(model)  # the blocks do act once the gates open
    with torch.no_grad():
        assert not torch.allclose(model.lm_logits(IDS, torch.ones_like(IDS), images()), alone)


def test_a_local_hf_llama_gets_the_blocks_and_is_unchanged_at_init(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    model = flamingo_model({"kind": "hf-causal-lm", "path": "lm"}, tmp_path, cross_attn_every=2)
    assert model.connector.inserted == [1, 3]
    alone = LlamaForCausalLM.from_pretrained(tmp_path / "lm").eval()
    with torch.no_grad():
        assert torch.equal(model.lm_logits(IDS, torch.ones_like(IDS), images()), alone(input_ids=IDS).logits)
    # The language part keeps its own state-dict keys; the blocks are the connector's.
    assert set(model.language.state_dict()) == set(alone.state_dict())
    assert any(k.startswith("blocks.1.attn.to_q") for k in model.connector.state_dict())


def test_each_token_sees_only_the_latest_image_before_it():
    model = flamingo_model()
    open_gates(model)
    first, second = images(seed=1), images(seed=2)
    changed_second = torch.cat([first[:, :1], second[:, 1:]], dim=1)
    with torch.no_grad():
        base = model.lm_logits(IDS, torch.ones_like(IDS), first)
        other = model.lm_logits(IDS, torch.ones_like(IDS), changed_second)
    assert torch.equal(base[:, :6], other[:, :6])  # before image 2's token: unchanged
    assert not torch.allclose(base[:, 6:], other[:, 6:])
    # At the cross-attention itself: tokens from image 2 on read image 2 only, tokens before image 1 none.
    block = model.connector.blocks[0]
    x = torch.randn(1, 9, 32)
    token_image = (IDS == IMAGE).long().cumsum(dim=1)
    latents = torch.randn(1, 2, 4, 16)
    swapped = latents.clone()
    swapped[:, 0] = torch.randn(4, 16)
    with torch.no_grad():
        a, b = block.attn(x, latents, token_image), block.attn(x, swapped, token_image)
    assert torch.equal(a[:, 6:], b[:, 6:]) and not torch.allclose(a[:, 3:6], b[:, 3:6])
    assert torch.equal(a[:, :3], torch.zeros_like(a[:, :3]))


def test_gradients_reach_the_gates_and_then_the_whole_connector():
    model = flamingo_model().train()
    labels = IDS.masked_fill(IDS == IMAGE, IGNORE)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels, "pixels": images()}
    model.losses(batch, ["lm"])["lm"].backward()
    for block in model.connector.blocks:
        assert block.attn_gate.grad.abs().item() > 0 and block.ff_gate.grad.abs().item() > 0
    model.zero_grad()
    open_gates(model, 0.5)
    model.losses(batch, ["lm"])["lm"].backward()
    for name, param in model.connector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_more_image_tokens_than_images_is_an_error():
    model = flamingo_model()
    with pytest.raises(ValueError, match="row 0 has 2 <image> tokens for 1 images"):
        model.lm_logits(IDS, torch.ones_like(IDS), images(1))


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_generation_matches_the_uncached_model(strategy):
    model = flamingo_model()
    open_gates(model, 0.8)
    prompts = [IDS[0].tolist(), IDS[0, :7].tolist()]
    pixels = torch.cat([images(seed=1), images(seed=5)])
    options = Decoding(strategy, max_new_tokens=6, num_beams=2)
    produced = generate(model, prompts, pixels, eos=2, options=options)
    if strategy == "greedy":
        expected = [greedy(model, p, pixels[i : i + 1], eos=2, max_new=6) for i, p in enumerate(prompts)]
        assert produced == expected
    assert all(len(row) > 0 and IMAGE not in row for row in produced)


def tokenizer_file(tmp_path) -> str:
    words = ["Question:", "Short", "answer:", "what", "color", "red", "blue", "Output:"]
    vocab = {**{k: v for k, v in SPECIAL.items()}, **{w: 5 + i for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_samples_and_few_shot_prompts_are_interleaved(tmp_path):
    codec = InterleavedCodec(tokenizer_file(tmp_path), SPECIAL, max_text=32)
    ids = lambda text: codec.ids(text)  # noqa: E731
    turns = [{"role": "user", "content": "<image>\nwhat color"}, {"role": "assistant", "content": "red"}]
    sample, labels = codec.sample(turns)
    assert sample == [IMAGE, *ids("Question: what color Short answer:"), *ids("red"), 2]
    assert labels == [IGNORE] * (1 + len(ids("Question: what color Short answer:"))) + [*ids("red"), 2]
    prompt = codec.prompt("what color", [("what color", "blue"), ("what color", "red")])
    assert prompt.count(IMAGE) == 3 and prompt[0] == 1
    assert prompt[-len(codec.query("what color")) :] == codec.query("what color")
    assert codec.chat(turns) == ([1, *sample], [IGNORE, *labels])
    spec = ModelSpec.model_validate({"vision": VIT, "connector": FLAMINGO, "language": LLAMA})
    assert is_flamingo(spec) and codec.stop_id == 2
    assert isinstance(flamingo_model().connector, Flamingo) and flamingo_model().num_image_tokens == 1


def test_spec_refuses_more_cross_attention_spacing_than_layers():
    with pytest.raises(ValueError, match="cross_attn_every is more than"):
        ModelSpec.model_validate({"vision": VIT, "connector": {**FLAMINGO, "cross_attn_every": 3}, "language": LLAMA})


def test_few_shot_inputs_put_the_examples_images_first(tmp_path):
    from io import BytesIO

    from PIL import Image

    from vlmflow.components.evaluate.shots import few_shot_inputs
    from vlmflow.components.train.data import ImageSpec

    def png(color: tuple) -> bytes:
        out = BytesIO()
        Image.new("RGB", (16, 16), color).save(out, "PNG")
        return out.getvalue()

    codec = InterleavedCodec(tokenizer_file(tmp_path), SPECIAL, max_text=32)
    spec = ImageSpec(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    shots = [[(png((255, 0, 0)), "what color", "red"), (png((0, 0, 255)), "what color", "blue")]]
    prompts, pixels = few_shot_inputs(codec, ["what color"], [png((0, 255, 0))], shots, spec)
    assert pixels.shape == (1, 3, 3, 16, 16)
    assert [int(np.argmax(pixels[0, i, :, 0, 0].numpy())) for i in range(3)] == [0, 2, 1]  # red, blue, green
    assert prompts[0] == codec.prompt("what color", [("what color", "red"), ("what color", "blue")])
