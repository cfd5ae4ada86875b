"""Connectors, objectives, freezing and LoRA of the model zoo (pure torch, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmflow.components.train.setup import (
    build_stage_model,
    merge_lora,
    model_config,
    read_model_folder,
    write_model_folder,
)
from vlmflow.models import objectives as obj
from vlmflow.models.connectors import CONNECTORS, build_connector
from vlmflow.models.vlm import VLM, Vocab, count_parameters
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.train import TrainStageSpec

SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<image>": 4, "<|system|>": 5, "<|user|>": 6,
           "<|assistant|>": 7}  # fmt: skip
VOCAB = Vocab(200, SPECIAL)
CONNECTOR_CASES = {
    "linear": ({"kind": "linear"}, 64),
    "mlp": ({"kind": "mlp", "layers": 3}, 64),
    "qformer": ({"kind": "qformer", "num_queries": 8, "hidden_size": 32}, 8),
    "resampler": ({"kind": "resampler", "num_latents": 6}, 6),
    "token-concat": ({"kind": "token-concat", "k": 4}, 16),
    "pixel-shuffle": ({"kind": "pixel-shuffle", "scale": 2}, 16),
    "patch-linear": ({"kind": "patch-linear"}, 64),
}


def model_spec(connector: dict, vision: dict | None = None, text: bool = False) -> ModelSpec:
    vision = vision or ({"kind": "none"} if connector["kind"] == "patch-linear" else {"kind": "tiny-vit"})
    spec = {"vision": vision, "connector": connector, "language": {"kind": "tiny-llama", "hidden_size": 32}}
    if text:
        spec["text"] = {"kind": "tiny-text", "hidden_size": 32}
    return ModelSpec.model_validate(spec)


def lm_batch(model: VLM, batch: int = 2, text: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.cat([torch.full((batch, model.num_image_tokens), 4), torch.randint(8, 200, (batch, text))], dim=1)
    labels = ids.clone()
    labels[:, : model.num_image_tokens] = obj.IGNORE
    return {
        "pixels": torch.randn(batch, 3, 64, 64),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "text_ids": torch.randint(8, 200, (batch, 5)),
        "text_mask": torch.ones(batch, 5, dtype=torch.long),
    }


def test_every_connector_kind_has_a_case():
    assert set(CONNECTORS.kinds()) == set(CONNECTOR_CASES)


@pytest.mark.parametrize("kind", sorted(CONNECTOR_CASES))
def test_connector_shapes_and_gradient_flow(kind):
    connector, tokens = CONNECTOR_CASES[kind]
    model = VLM(model_spec(connector), VOCAB)
    assert model.num_image_tokens == tokens
    batch = lm_batch(model)
    out = model.image_tokens(batch["pixels"])
    assert out.shape == (2, tokens, 32)
    loss = model.losses(batch, ["lm"])["lm"]
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.connector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_token_concat_concatenates_adjacent_tokens():
    spec = model_spec({"kind": "token-concat", "k": 2}).connector
    layer = build_connector(spec, 3, 6, 4)
    features = torch.arange(24, dtype=torch.float32).reshape(1, 4, 6 // 2 * 1 * 2)[:, :, :3]
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(6))
        layer.proj.bias.zero_()
    out = layer(features)
    assert torch.equal(out[0, 0], torch.cat([features[0, 0], features[0, 1]]))
    assert torch.equal(out[0, 1], torch.cat([features[0, 2], features[0, 3]]))


def test_pixel_shuffle_groups_2x2_neighbourhoods():
    spec = model_spec({"kind": "pixel-shuffle", "scale": 2}).connector
    layer = build_connector(spec, 1, 4, 16)
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # 4x4 grid, value = row*4+col
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(4))
        layer.proj.bias.zero_()
    out = layer(grid)
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 4, 5]  # top-left 2x2 block
    assert out[0, 3].tolist() == [10, 11, 14, 15]


def test_connector_misfit_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of k=3"):
        build_connector(model_spec({"kind": "token-concat", "k": 3}).connector, 8, 8, 64)
    with pytest.raises(ValueError, match="square grid"):
        build_connector(model_spec({"kind": "pixel-shuffle", "scale": 2}).connector, 8, 8, 65)


def test_itc_known_value():
    embeddings = torch.eye(4)
    loss = obj.itc_loss(embeddings, embeddings, torch.tensor(math.log(2.0)))
    assert loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-2)), rel=1e-6)


def test_itc_is_symmetric_cross_entropy():
    torch.manual_seed(1)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    logits = 2.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    targets = torch.arange(5)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    assert obj.itc_loss(image, text, torch.tensor(math.log(2.0))).item() == pytest.approx(expected.item(), rel=1e-6)


def test_siglip_known_value():
    t, b, n = 5.0, -2.0, 3
    loss = obj.siglip_loss(torch.eye(n), torch.eye(n), torch.tensor(math.log(t)), torch.tensor(b))
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    expected = -(log_sigmoid(t + b) + (n - 1) * log_sigmoid(-b))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_lm_loss_ignores_masked_positions():
    torch.manual_seed(2)
    logits = torch.randn(1, 5, 10)
    labels = torch.tensor([[obj.IGNORE, obj.IGNORE, 3, 4, obj.IGNORE]])
    loss = obj.lm_loss(logits, labels)
    expected = F.cross_entropy(logits[0, 1:3], torch.tensor([3, 4]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.clone()
    changed[0, 0] += 100  # predicts a masked position: must not matter
    changed[0, 3:] += 100
    assert obj.lm_loss(changed, labels).item() == pytest.approx(loss.item(), rel=1e-6)


def test_lm_loss_weighs_every_sample_alike_whatever_its_answer_length():
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 10)
    ignore = obj.IGNORE
    labels = torch.tensor([[ignore, 1, ignore, ignore, ignore], [ignore, 2, 3, 4, 5], [ignore] * 5])
    short = F.cross_entropy(logits[0, :1], torch.tensor([1]))
    long = F.cross_entropy(logits[1, :4], torch.tensor([2, 3, 4, 5]))
    # the third sample has nothing to learn and does not count
    assert obj.lm_loss(logits, labels).item() == pytest.approx((short + long).item() / 2, rel=1e-6)
    assert obj.lm_loss(logits, torch.full((3, 5), ignore)).item() == 0.0


def test_hardest_negatives_skip_identical_captions():
    similarity = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.3], [0.95, 0.1, 0.9]])
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    neg_text, neg_image = obj.hardest_negatives(similarity, same)
    assert neg_text.tolist() == [2, 2, 0]  # row 0 may not pick text 1 (the same caption)
    assert neg_image.tolist() == [2, 2, 1]  # text 2: images 0 and 1 allowed, 0.3 > 0.1


def test_sampled_negatives_follow_similarity_and_skip_identical_captions():
    similarity = torch.tensor([[5.0, 4.0, 0.0, 4.0], [0.0, 5.0, 0.0, 0.0], [1.0, 1.0, 5.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # texts 0 and 1 are the same caption
    draws = [obj.sampled_negatives(similarity, same, torch.Generator().manual_seed(s)) for s in range(200)]
    texts = torch.stack([t for t, _ in draws])
    images = torch.stack([i for _, i in draws])
    assert not (texts[:, 0] == 0).any() and not (texts[:, 0] == 1).any()  # own and identical captions never
    assert not (images[:, 1] == 0).any() and not (images[:, 1] == 1).any()
    assert (texts[:, 0] == 3).float().mean() > 0.9  # softmax weight e^4 / (e^4 + e^0)
    assert (texts[:, 2] == 3).float().mean() > 0.9
    assert set(texts[:, 3].tolist()) == {0, 1, 2}  # uniform over the others, not always the argmax
    again = obj.sampled_negatives(similarity, same, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again, draws[0], strict=True))


def test_sampled_negatives_when_every_caption_is_identical():
    same = torch.ones(3, 3, dtype=torch.bool)
    neg_text, neg_image = obj.sampled_negatives(torch.zeros(3, 3), same)
    assert neg_text.shape == neg_image.shape == (3,)  # any index: the caller drops these rows


def test_edited_negatives_differ_from_their_caption_in_one_place():
    pad = 0
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 7, 8, 0], [5, 6, 7, 8, 10]])
    mask = (ids != pad).long()
    edited, edited_mask, usable = obj.edited_negatives(ids, mask, 3, pad, torch.Generator().manual_seed(0))
    assert edited.shape[0] == edited_mask.shape[0] == usable.shape[0] == 9
    rows = [r[m.bool()].tolist() for r, m in zip(edited, edited_mask, strict=True)]
    originals = [[5, 6, 7, 8], [5, 9, 7, 8], [5, 6, 7, 8, 10]]
    assert usable.all()
    for k, row in enumerate(rows):
        caption = originals[k // 3]
        assert row != caption and set(row) <= {t for o in originals for t in o}  # tokens of the batch only
        if len(row) == len(caption):  # one token replaced
            assert sum(a != b for a, b in zip(row, caption, strict=True)) == 1
        else:  # one token deleted or inserted
            short, long = sorted((row, caption), key=len)
            assert len(long) - len(short) == 1 and any(long[:i] + long[i + 1 :] == short for i in range(len(long)))
    again = obj.edited_negatives(ids, mask, 3, pad, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], edited) and torch.equal(again[2], usable)


def test_match_head_layers_come_from_the_text_spec_and_survive_a_model_folder(tmp_path):
    spec = model_spec({"kind": "mlp"}, text=True)
    assert "match_layers" not in spec.model_dump(mode="json")["text"]  # default: cache keys as before the option
    deep_spec = ModelSpec.model_validate(
        {**spec.model_dump(mode="json"), "text": {"kind": "tiny-text", "hidden_size": 32, "match_layers": 2}}
    )
    torch.manual_seed(0)
    shallow, deep = VLM(spec, VOCAB), VLM(deep_spec, VOCAB)
    assert len(shallow.heads["match"].fusion.layers) == 1 and len(deep.heads["match"].fusion.layers) == 2
    batch = lm_batch(deep, batch=4)

    def match_logits(model: VLM) -> torch.Tensor:
        model.eval()
        features, _ = model.embed_image(batch["pixels"])
        states, _ = model.embed_text(batch["text_ids"], batch["text_mask"])
        return model.heads["match"](states, batch["text_mask"], features)

    logits = match_logits(deep)
    assert logits.shape == (4, 2)
    write_model_folder(
        tmp_path / "m", deep.state_dict(), model_config(deep_spec, VOCAB, {}, deep.num_image_tokens), None
    )
    again, _ = read_model_folder(tmp_path / "m")
    assert torch.allclose(match_logits(again), logits)


def test_edited_negatives_unusable_when_every_caption_is_identical():
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    edited, _, usable = obj.edited_negatives(ids, torch.ones_like(ids), 2, 0)
    assert edited.shape == (4, 3) and not usable.any()


def test_itm_with_edited_negatives_adds_rows_and_trains_the_text_encoder():
    torch.manual_seed(0)
    model = build_stage_model(
        model_spec({"kind": "mlp"}, text=True),
        VOCAB,
        stage(trainable=["text", "heads"], objectives=[{"kind": "itm", "edited_negatives": 2}]),
        None,
    )
    assert model.itm_edited_negatives == 2
    batch = lm_batch(model, batch=4)
    loss = model(batch, ["itm"])["itm"]
    assert torch.isfinite(loss)
    loss.backward()
    assert model.heads["match"].classifier.weight.grad.abs().sum() > 0
    plain = build_stage_model(model_spec({"kind": "mlp"}, text=True), VOCAB, stage(trainable=["heads"]), None)
    assert plain.itm_edited_negatives == 0  # off unless a stage asks for it
    dumped = stage(objectives=[{"kind": "itm"}]).model_dump(mode="json")["objectives"]
    assert dumped == [{"weight": 1.0, "kind": "itm"}]  # off: the cache key of a stage is as before the option


def test_all_objectives_together_give_finite_gradients():
    model = VLM(model_spec({"kind": "mlp"}, text=True), VOCAB)
    batch = lm_batch(model, batch=4)
    losses = model(batch, ["lm", "itc", "siglip", "itm"])
    assert set(losses) == {"lm", "itc", "siglip", "itm"}
    sum(losses.values()).backward()
    assert model.heads["match"].classifier.weight.grad.abs().sum() > 0
    assert model.heads["contrastive"].log_scale.grad is not None


def stage(**overrides) -> TrainStageSpec:
    base = {"name": "s", "trainable": ["connector"], "objectives": [{"kind": "lm"}]}
    return TrainStageSpec.model_validate({**base, **overrides})


def test_freezing_keeps_frozen_parts_unchanged():
    torch.manual_seed(3)
    model = build_stage_model(model_spec({"kind": "mlp"}), VOCAB, stage(), None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(lm_batch(model), ["lm"])["lm"].backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("connector.") for k in changed)
    counts = count_parameters(model)
    assert counts["trainable"] == counts["connector_total"] > 0


def test_lora_adds_only_adapters_and_merges_exactly():
    torch.manual_seed(4)
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    model = build_stage_model(model_spec({"kind": "mlp"}), VOCAB, stage(lora=lora), None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    assert trainable - adapters == {n for n, _ in model.connector.named_parameters(prefix="connector")}
    layers, width = 2, 32  # tiny-llama: q_proj and v_proj are 32x32 in each layer
    assert sum(model.get_parameter(n).numel() for n in adapters) == layers * 2 * 4 * (width + width)
    with torch.no_grad():  # make the adapters non-zero so merging matters
        for name in adapters:
            model.get_parameter(name).normal_(0, 0.1)
    batch = lm_batch(model)
    with torch.no_grad():
        expected = model.lm_logits(batch["input_ids"], batch["attention_mask"], batch["pixels"])
        plain = VLM(model.spec, VOCAB)
        plain.load_state_dict(merge_lora(model), strict=True)
        merged = plain.lm_logits(batch["input_ids"], batch["attention_mask"], batch["pixels"])
    assert torch.allclose(expected, merged, atol=1e-5)


def test_image_positions_must_match_image_tokens():
    model = VLM(model_spec({"kind": "linear"}), VOCAB)
    batch = lm_batch(model)
    ids = batch["input_ids"][:, 1:]
    with pytest.raises(ValueError, match="<image> positions"):
        model.lm_logits(ids, torch.ones_like(ids), batch["pixels"])


def test_missing_local_weights_are_a_clear_error(tmp_path):
    from vlmflow.errors import UserError
    from vlmflow.models.language import build_language
    from vlmflow.models.vision import build_vision, image_spec

    spec = ModelSpec.model_validate(
        {"vision": {"kind": "hf-clip-vision", "path": "clip"}, "connector": {"kind": "mlp"},
         "language": {"kind": "hf-causal-lm", "path": "lm"}},
        context={"spec_dir": tmp_path},
    )  # fmt: skip
    with pytest.raises(UserError, match=r"model.vision.path: .*clip is not a Hugging Face model folder"):
        build_vision(spec.vision)
    with pytest.raises(UserError, match=r"model\.vision\.path"):
        image_spec(spec.vision)
    with pytest.raises(UserError, match=r"model.language.path: .*lm is not a Hugging Face model folder"):
        build_language(spec.language, 100, SPECIAL)


def test_local_hf_folders_load_through_the_same_path(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)  # fmt: skip
    CLIPVisionModel(vision_config).save_pretrained(tmp_path / "clip")
    lm_config = LlamaConfig(vocab_size=150, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4)  # fmt: skip
    LlamaForCausalLM(lm_config).save_pretrained(tmp_path / "lm")
    spec = ModelSpec.model_validate(
        {"vision": {"kind": "hf-clip-vision", "path": "clip"}, "connector": {"kind": "mlp"},
         "language": {"kind": "hf-causal-lm", "path": "lm"}},
        context={"spec_dir": tmp_path},
    )  # fmt: skip
    model = VLM(spec, VOCAB)  # vocabulary 200 > 150: embeddings grow to fit the tokenizer
    assert model.language.get_input_embeddings().num_embeddings == 200
    saved = CLIPVisionModel.from_pretrained(str(tmp_path / "clip"))
    assert torch.equal(model.vision.model.state_dict()["embeddings.patch_embedding.weight"],
                       saved.state_dict()["vision_model.embeddings.patch_embedding.weight"]
                       if "vision_model.embeddings.patch_embedding.weight" in saved.state_dict()
                       else saved.state_dict()["embeddings.patch_embedding.weight"])  # fmt: skip
    assert model.num_image_tokens == 16


def test_greedy_never_emits_the_image_placeholder():
    from vlmflow.components.train.evaluate import greedy

    torch.manual_seed(6)
    model = VLM(model_spec({"kind": "linear"}), VOCAB)
    plain = model.lm_logits

    def image_favoured(*args):  # <image> is by far the most likely next token
        logits = plain(*args).clone()
        logits[..., SPECIAL["<image>"]] += 1000.0
        return logits

    model.lm_logits = image_favoured
    prompt = [1, 6, *[4] * model.num_image_tokens, 20, 7]
    out = greedy(model, prompt, torch.randn(1, 3, 64, 64), eos=-1, max_new=3)
    assert len(out) == 3 and SPECIAL["<image>"] not in out
