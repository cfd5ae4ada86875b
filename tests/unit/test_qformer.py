"""BLIP-2's Q-Former: what its attention masks let each position see, stage 1's objectives on it,
stage 2's soft prompt from stage 1's weights, and `vlmflow plan`'s count of its parameters."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_estimate import VOCAB, tiny
from vlmflow.components.train.setup import build_stage_model, model_config, write_model_folder
from vlmflow.models import objectives as obj
from vlmflow.models.estimate import trace_stage
from vlmflow.models.qformer import CLS, DEC, attention_mask, generation_targets, with_start
from vlmflow.models.vlm import VLM, count_parameters
from vlmflow.specs.model import ModelSpec

QFORMER = {"kind": "qformer", "num_queries": 4, "hidden_size": 32, "layers": 4, "heads": 4}


def blip2(**connector) -> VLM:
    torch.manual_seed(0)
    spec = ModelSpec.model_validate(
        {
            "vision": {"kind": "tiny-vit", "hidden_size": 32, "patch_size": 16},
            "connector": {**QFORMER, **connector},
            "language": {"kind": "tiny-llama", "hidden_size": 32},
            "text": {"kind": "qformer", "max_length": 8},
            "embed_dim": 16,
        }
    )
    return VLM(spec, VOCAB).eval()


def encode(model: VLM, features, ids, mask, mode, start=CLS):
    text = model.text.embed(ids, start)
    return model.connector.encode(features, text, with_start(mask), mode, model.text.ffs)


@pytest.fixture
def inputs():
    torch.manual_seed(1)
    features = torch.randn(2, 16, 32)
    ids = torch.randint(10, 500, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return features, ids, mask


def test_the_masks_by_hand():
    """2 queries, then 3 text positions of which the last is padding."""
    text = torch.tensor([[1, 1, 0]])
    unimodal = attention_mask("unimodal", 2, text)[0].int().tolist()
    assert unimodal == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    bidirectional = attention_mask("bidirectional", 2, text)[0].int().tolist()
    assert bidirectional == [[1, 1, 1, 1, 0]] * 5
    causal = attention_mask("causal", 2, text)[0].int().tolist()
    assert causal == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


def test_cross_attention_every_other_layer():
    layers = blip2().connector.layers
    assert [layer.cross_attn is not None for layer in layers] == [True, False, True, False]
    assert [layer.cross_attn is not None for layer in blip2(cross_attention_freq=1).connector.layers] == [True] * 4


@torch.no_grad()
def test_unimodal_queries_and_text_do_not_see_each_other(inputs):
    model = blip2()
    features, ids, mask = inputs
    queries, text = encode(model, features, ids, mask, "unimodal")
    other_queries, _ = encode(model, features, torch.randint(10, 500, ids.shape), mask, "unimodal")
    _, other_text = encode(model, torch.randn_like(features), ids, mask, "unimodal")
    assert torch.allclose(queries, other_queries, atol=1e-6)  # another text: the same query outputs
    assert torch.allclose(text, other_text, atol=1e-6)  # another image: the same text outputs
    # ... and they are what the image and text embeddings (embed_image, embed_text) compute alone
    alone, _ = model.connector.encode(features, None, None, "unimodal")
    _, text_alone = model.connector.encode(
        None, model.text.embed(ids, CLS), with_start(mask), "unimodal", model.text.ffs
    )
    assert torch.allclose(queries, alone, atol=1e-6) and torch.allclose(text, text_alone, atol=1e-5)


@torch.no_grad()
def test_bidirectional_queries_read_the_text(inputs):
    model = blip2()
    features, ids, mask = inputs
    queries, _ = encode(model, features, ids, mask, "bidirectional")
    changed = ids.clone()
    changed[:, 0] += 1
    other, _ = encode(model, features, changed, mask, "bidirectional")
    assert (queries - other).abs().amax(dim=(1, 2)).min() > 1e-4  # every row's queries changed
    padded = ids.clone()
    padded[1, 4:] = 7  # padding is never read
    again, _ = encode(model, features, padded, mask, "bidirectional")
    assert torch.allclose(queries, again, atol=1e-6)


@torch.no_grad()
def test_causal_text_sees_the_queries_and_its_past_only(inputs):
    model = blip2()
    features, ids, mask = inputs
    queries, text = encode(model, features, ids, mask, "causal", DEC)
    later = ids.clone()
    later[:, 3] += 1  # text position 4 ([DEC] is position 0)
    other_queries, other_text = encode(model, features, later, mask, "causal", DEC)
    assert torch.allclose(queries, other_queries, atol=1e-6)  # the queries do not see the text
    assert torch.allclose(text[:, :4], other_text[:, :4], atol=1e-6)  # earlier tokens do not see a later one
    assert (text[:, 4:] - other_text[:, 4:]).abs().max() > 1e-4
    _, image_changed = encode(model, torch.randn_like(features), ids, mask, "causal", DEC)
    assert (text[:, 0] - image_changed[:, 0]).abs().max() > 1e-4  # [DEC] already sees the image's queries


def test_generation_targets_end_with_eos():
    ids = torch.tensor([[11, 12, 13], [21, 22, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ignore = obj.IGNORE
    assert generation_targets(ids, mask, eos=2).tolist() == [[11, 12, 13, 2], [21, 22, 2, ignore]]


def test_itc_scores_a_text_by_the_images_best_query():
    torch.manual_seed(0)
    image, text = torch.randn(3, 4, 8), torch.randn(5, 8)
    per_query = torch.stack([obj.contrastive_logits(image[:, q], text, torch.tensor(0.0)) for q in range(4)])
    assert torch.allclose(obj.contrastive_logits(image, text, torch.tensor(0.0)), per_query.amax(dim=0))


def test_stage1_objectives_train_the_qformer_and_stage2_starts_from_them(tmp_path):
    recipe, pretrain, _ = tiny("blip2-tiny", 0)
    generate = recipe.stages[1]
    model = build_stage_model(recipe.model, VOCAB, pretrain, None)
    torch.manual_seed(2)
    ids = torch.randint(10, 500, (6, 7))
    batch = {"pixels": torch.randn(6, 3, 64, 64), "text_ids": ids, "text_mask": torch.ones_like(ids)}
    losses = model(batch, ["itc", "itm", "itg"])
    assert losses.keys() == {"itc", "itm", "itg"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"connector", "text", "heads"}  # the vision tower and the LM stay frozen
    assert model.text.words.weight.grad.abs().sum() > 0 and model.connector.queries.grad.abs().sum() > 0
    folder = tmp_path / "model"
    write_model_folder(folder, model.state_dict(), model_config(recipe.model, VOCAB, {}, 8), None)
    second = build_stage_model(recipe.model, VOCAB, generate, tmp_path / "model")
    assert torch.equal(second.connector.queries, model.connector.queries)
    assert {n.split(".")[0] for n, p in second.named_parameters() if p.requires_grad} == {"connector", "language"}
    tokens = second.image_tokens(batch["pixels"])  # the soft prompt: one LM-wide token per query
    assert tokens.shape == (6, 8, second.language.get_input_embeddings().embedding_dim)


def test_plan_counts_the_qformer_exactly():
    recipe, pretrain, image = tiny("blip2-tiny", 0)
    trace = trace_stage(recipe.model, VOCAB, pretrain, image, 2)
    model = build_stage_model(recipe.model, VOCAB, pretrain, None)
    assert trace.params == count_parameters(model)
    # By hand, width 64, 8 queries, 3 layers, ViT features 64, the vocabulary 512, the LM width 64:
    linear = lambda i, o: i * o + o  # noqa: E731
    norm, ff = 2 * 64, 2 * 64 + linear(64, 256) + linear(256, 64)
    attention = linear(64, 64) + linear(64, 128) + linear(64, 64)
    layer = norm + attention + ff  # self-attention and the queries' feed-forward
    cross = norm + attention  # layers 0 and 2 (every other layer)
    connector = 8 * 64 + 2 * 64 + 3 * layer + 2 * cross + 2 * 64 + linear(64, 64)  # queries, feature norm, ..., proj
    text = 512 * 64 + 33 * 64 + 2 * 64 + 2 * 64 + 3 * ff + 2 * 64 + 512  # words, positions, starts, norms, head
    heads = 2 * 64 * 64 + 2 + linear(64, 2)
    assert (trace.params["connector_total"], trace.params["text_total"]) == (connector, text)
    assert trace.params["heads_total"] == heads
    assert trace.params["trainable"] == connector + text + heads
