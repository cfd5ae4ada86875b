"""Sequence packing: the packer's rows, and a packed batch's loss and logits equal to the padded one's
for the built-in tiny Llama and a Llama loaded from a local Hugging Face folder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vlmflow.components.train.packing import pack_batch, plan_rows
from vlmflow.models import objectives as obj
from vlmflow.models.packed import block_causal_mask, packed_lm_loss, segment_positions
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec

SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<image>": 4, "<|system|>": 5, "<|user|>": 6,
           "<|assistant|>": 7}  # fmt: skip
VOCAB = Vocab(200, SPECIAL)
MAX_TEXT = 24  # a stage's max_text_tokens: rows hold up to 1 + image tokens + MAX_TEXT tokens, as in training


def test_rows_hold_every_sample_once_within_capacity_longest_first():
    lengths = [5, 9, 3, 7, 2, 4, 9]
    rows = plan_rows(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[1], [6], [3, 2], [0, 5], [4]]  # first fit, longest first, ties by position
    assert plan_rows(lengths, capacity=10) == rows  # the same samples pack the same way


def test_an_over_long_sample_gets_a_row_of_its_own_and_is_not_cut():
    rows = plan_rows([4, 15, 3], capacity=8)
    assert rows == [[1], [0, 2]]
    assert plan_rows([], capacity=8) == []


def test_positions_restart_and_attention_stays_within_each_sample():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0]]
    allowed = block_causal_mask(segments, torch.bool)[0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False]
    assert allowed[2].tolist() == [True, True, True, False, False, False]
    additive = block_causal_mask(segments, torch.float32)[0, 0]
    assert torch.equal(additive == 0, allowed) and additive.min() == torch.finfo(torch.float32).min


def samples(image_tokens: int, lengths: list[int]) -> dict[str, torch.Tensor]:
    """A padded batch shaped like the Collator's: <bos> <|user|> image tokens, prompt, then an answer that
    is learned; one image per row."""
    torch.manual_seed(1)
    rows, labels = [], []
    for n in lengths:
        prompt = [1, 6, *[4] * image_tokens, *torch.randint(8, 200, (2,)).tolist(), 7]
        answer = [*torch.randint(8, 200, (n,)).tolist(), 2]
        rows.append(prompt + answer)
        labels.append([obj.IGNORE] * len(prompt) + answer)
    ids, mask = obj.pad_rows(rows, 0)
    padded_labels, _ = obj.pad_rows(labels, obj.IGNORE)
    return {"pixels": torch.randn(len(lengths), 3, 64, 64), "input_ids": ids, "attention_mask": mask,
            "labels": padded_labels}  # fmt: skip


def test_a_packed_batch_keeps_each_sample_whole_and_its_image_in_order():
    batch = samples(3, [2, 9, 1, 5, 4])
    lengths = batch["attention_mask"].sum(1).tolist()
    capacity = 1 + 3 + MAX_TEXT
    packed = pack_batch(batch, capacity, image_id=4, pad_id=0)
    rows = plan_rows(lengths, capacity)
    assert packed["input_ids"].shape[0] == len(rows) < len(lengths)
    assert int(packed["attention_mask"].sum()) == sum(lengths)
    order = [i for row in rows for i in row]
    assert torch.equal(packed["pixels"], batch["pixels"][order])
    for r, row in enumerate(rows):
        for segment, i in enumerate(row, start=1):
            at = packed["segment_ids"][r] == segment
            assert torch.equal(packed["input_ids"][r][at], batch["input_ids"][i, : lengths[i]])
            assert torch.equal(packed["labels"][r][at], batch["labels"][i, : lengths[i]])
        assert (packed["labels"][r][packed["segment_ids"][r] == 0] == obj.IGNORE).all()


def tiny_llama() -> VLM:
    spec = {"vision": {"kind": "tiny-vit"}, "connector": {"kind": "token-concat", "k": 16},
            "language": {"kind": "tiny-llama", "hidden_size": 32}}  # fmt: skip
    torch.manual_seed(0)
    return VLM(ModelSpec.model_validate(spec), VOCAB)


def local_llama(folder, attention: str) -> VLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder / "lm")
    spec = {"vision": {"kind": "tiny-vit"}, "connector": {"kind": "token-concat", "k": 16},
            "language": {"kind": "hf-causal-lm", "path": "lm"}}  # fmt: skip
    model = VLM(ModelSpec.model_validate(spec, context={"spec_dir": folder}), VOCAB)
    model.language.set_attn_implementation(attention)
    return model


@pytest.mark.parametrize("build", ["tiny-llama", "hf-llama-sdpa", "hf-llama-eager"])
def test_packed_loss_and_logits_equal_the_padded_batch(build, tmp_path):
    model = tiny_llama() if build == "tiny-llama" else local_llama(tmp_path, build.rpartition("-")[2])
    model.eval()
    batch = samples(model.num_image_tokens, [2, 11, 1, 6, 4, 9])
    lengths = batch["attention_mask"].sum(1).tolist()
    capacity = 1 + model.num_image_tokens + MAX_TEXT
    packed = pack_batch(batch, capacity, image_id=4, pad_id=0)
    rows = plan_rows(lengths, capacity)
    assert len(rows) < len(lengths) and max(lengths) <= capacity
    with torch.no_grad():
        padded_logits = model.lm_logits(batch["input_ids"], batch["attention_mask"], batch["pixels"])
        packed_logits = model.lm_logits(packed["input_ids"], packed["attention_mask"], packed["pixels"],
                                        packed["segment_ids"])  # fmt: skip
        padded_loss = model.losses(batch, ["lm"])["lm"]
        packed_loss = model.losses(packed, ["lm"])["lm"]
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5, rtol=0)
    assert torch.allclose(packed_loss, packed_lm_loss(packed_logits, packed["labels"], packed["segment_ids"]))
    padded_sum = token_loss_sum(padded_logits, batch["labels"])
    packed_sum = token_loss_sum(packed_logits, packed["labels"], packed["segment_ids"])
    assert abs(packed_sum - padded_sum) <= 1e-5 * max(1.0, abs(padded_sum))
    for r, row in enumerate(rows):
        for segment, i in enumerate(row, start=1):
            at = packed["segment_ids"][r] == segment
            assert torch.allclose(packed_logits[r][at], padded_logits[i, : lengths[i]], atol=1e-5, rtol=0)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None = None) -> float:
    """Summed next-token loss; in packed rows a sample's first token is not predicted from the one before."""
    targets = labels[:, 1:]
    if segments is not None:
        targets = targets.masked_fill(segments[:, 1:] != segments[:, :-1], obj.IGNORE)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return float(F.cross_entropy(flat, targets.reshape(-1), ignore_index=obj.IGNORE, reduction="sum"))


def test_packed_gradients_equal_the_padded_ones():
    model = tiny_llama()
    batch = samples(model.num_image_tokens, [3, 8, 2, 5])
    packed = pack_batch(batch, 1 + model.num_image_tokens + MAX_TEXT, image_id=4, pad_id=0)
    assert len(packed["input_ids"]) < len(batch["input_ids"])
    grads = []
    for b in (batch, packed):
        model.zero_grad()
        model.losses(b, ["lm"])["lm"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_packing_is_refused_for_objectives_that_compare_whole_samples():
    base = {"name": "s", "trainable": ["connector"], "packing": True}
    assert TrainStageSpec.model_validate({**base, "objectives": [{"kind": "lm"}]}).packing
    with pytest.raises(ValueError, match="packing trains the lm objective only; itc compare whole samples"):
        TrainStageSpec.model_validate({**base, "objectives": [{"kind": "lm"}, {"kind": "itc"}]})
    off = TrainStageSpec.model_validate({**base, "packing": False, "objectives": [{"kind": "lm"}]})
    assert "packing" not in off.model_dump(mode="json")  # off: the stage's cache key is as before the option
