"""Pretrained text towers from local folders (hf-clip-text, hf-siglip-text, hf-bert), with tiny folders
written by save_pretrained (tests/hf_text.py): the spec checks a folder's model type at the field, the
built tower gives the HF model's own outputs when fed through the recipe's tokenizer (the folder's,
with vlmflow's special tokens added), contrastive training with them lowers the loss, their layers are
the transformer blocks FSDP and activation checkpointing wrap, and a recipe pointed at them validates
and plans through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError
from transformers import AutoTokenizer, BertModel, CLIPTextModel, CLIPTextModelWithProjection, SiglipTextModel

from tests.hf_text import FOLDERS, PROJECTION, captions, write_text_folder
from vlmflow.cli import cli
from vlmflow.components.sources.synthetic import make_row
from vlmflow.components.tokenize import load_pretrained
from vlmflow.components.train.data import ImageSpec, preprocess
from vlmflow.components.train.setup import build_stage_model
from vlmflow.components.train.sharding import transformer_blocks
from vlmflow.errors import UserError
from vlmflow.models.objectives import pad_rows
from vlmflow.models.vision import CLIP_MEAN, CLIP_STD
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.specs.data import SyntheticShapesSource
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.recipe import BpeTokenizer, PretrainedTokenizer
from vlmflow.specs.train import TrainStageSpec

RECIPES = Path(__file__).resolve().parents[2] / "specs" / "recipes"
KINDS = list(FOLDERS)
VISION = {"kind": "tiny-vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "layers": 1, "heads": 4}
TEXTS = ["an image with a red circle.", "an image with two blue squares and a green triangle."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("towers")
    for kind in KINDS:
        write_text_folder(root, kind)
    write_text_folder(root / "plain", "hf-clip-text", projection=False)
    return root


def spec_of(root: Path, kind: str, folder: str | None = None, **text) -> ModelSpec:
    text = {"kind": kind, "path": folder or FOLDERS[kind], "max_length": 16, **text}
    return ModelSpec.model_validate(
        {"vision": VISION, "text": text, "embed_dim": PROJECTION}, context={"spec_dir": root}
    )


def recipe_tokenizer(folder: Path):
    """What the tokenizer stage writes for `tokenizer: {kind: pretrained, path: folder}`, and its special ids."""
    listed = BpeTokenizer(kind="bpe").special_tokens  # vlmflow's special tokens, added where missing
    tokenizer, special, _ = load_pretrained(PretrainedTokenizer.model_validate(
        {"kind": "pretrained", "path": folder, "special_tokens": listed}, context={"spec_dir": folder}))  # fmt: skip
    return tokenizer, special


def model_of(spec: ModelSpec, folder: Path) -> tuple[VLM, object, dict]:
    tokenizer, special = recipe_tokenizer(folder)
    return VLM(spec, Vocab(tokenizer.get_vocab_size(), special)), tokenizer, special


def text_batch(tokenizer, special: dict, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption ids as the collator makes them: no special tokens, right-padded with vlmflow's <pad>."""
    return pad_rows([tokenizer.encode(t, add_special_tokens=False).ids for t in texts], special["<pad>"])


def test_specs_validate_and_a_folder_of_another_model_type_is_an_error_at_its_path(folders):
    for kind in KINDS:
        assert spec_of(folders, kind).text.path == folders / FOLDERS[kind]
    with pytest.raises(ValidationError) as error:
        spec_of(folders, "hf-clip-text", "bert")
    (problem,) = error.value.errors()
    assert problem["loc"] == ("text", "hf-clip-text", "path")
    assert (
        f"{folders / 'bert'} holds a bert model; hf-clip-text takes model_type clip_text_model or clip"
        in problem["msg"]
    )
    with pytest.raises(ValidationError, match="holds a siglip_text_model model; hf-bert takes model_type bert"):
        spec_of(folders, "hf-bert", "siglip-text")
    missing = spec_of(folders, "hf-bert", "absent")  # full-size specs validate without their weights
    with pytest.raises(UserError, match=r"model\.text\.path: .*absent is not a Hugging Face model folder"):
        model_of(missing, folders / "bert")
    with pytest.raises(
        UserError, match=r"model\.text\.max_length: 40 tokens and 2 special ones exceed the 40 positions"
    ):
        model_of(spec_of(folders, "hf-bert", max_length=40), folders / "bert")


def hf_reference(kind: str, folder: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(last hidden state, mask, text embedding) of the transformers model on its own tokenizer's ids."""
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if kind == "hf-siglip-text":  # as SigLIP was trained: padded to its positions, no attention mask
        model = SiglipTextModel.from_pretrained(str(folder)).eval()
        inputs = hf_tokenizer(texts, padding="max_length", max_length=model.config.max_position_embeddings,
                              return_tensors="pt")  # fmt: skip
        out = model(input_ids=inputs["input_ids"])
        return out.last_hidden_state, inputs["attention_mask"], out.pooler_output
    inputs = hf_tokenizer(texts, padding=True, return_tensors="pt")
    if kind == "hf-bert":
        out = BertModel.from_pretrained(str(folder)).eval()(**inputs)
        return out.last_hidden_state, inputs["attention_mask"], out.last_hidden_state[:, 0]
    if folder.parent.name == "plain":
        out = CLIPTextModel.from_pretrained(str(folder)).eval()(**inputs)
        return out.last_hidden_state, inputs["attention_mask"], out.pooler_output
    out = CLIPTextModelWithProjection.from_pretrained(str(folder)).eval()(**inputs)
    return out.last_hidden_state, inputs["attention_mask"], out.text_embeds


@pytest.mark.parametrize("case", [*KINDS, "hf-clip-text-plain"])
def test_tower_gives_the_hf_models_outputs(folders, case):
    kind = case.removesuffix("-plain")
    root = folders / "plain" if case.endswith("plain") else folders
    folder = root / FOLDERS[kind]
    model, tokenizer, special = model_of(spec_of(root, kind), folder)
    model.eval()
    ids, mask = text_batch(tokenizer, special, TEXTS)
    assert int(ids.max()) >= model.text.vocab_size  # vlmflow's <pad> is not the text model's
    with torch.no_grad():
        states, pooled = model.text(ids, mask)
        embedded = model.heads["contrastive"].text_proj(pooled)
        hidden, hf_mask, hf_embedded = hf_reference(kind, folder, TEXTS)
    prefix = len(model.text.prefix)
    assert torch.equal(hf_mask[:, prefix : prefix + ids.shape[1]].bool() & mask.bool(), mask.bool())
    real = mask.bool()
    assert torch.allclose(states[real], hidden[:, prefix : prefix + ids.shape[1]][real], atol=1e-5)
    if case == "hf-clip-text-plain":  # no text_projection in the folder: the pooled output, a new projection
        assert torch.allclose(pooled, hf_embedded, atol=1e-5) and model.heads["contrastive"].text_proj.in_features == 32
    else:  # the folder's projection (CLIP text_projection, SigLIP head) is the head's, or BERT's [CLS] output
        assert torch.allclose(pooled if kind == "hf-bert" else embedded, hf_embedded, atol=1e-5)
    with torch.no_grad():  # weights really loaded: the same tower from the config alone gives other outputs
        fresh = VLM(model.spec, model.vocab, load_weights=False).eval()
        assert not torch.allclose(fresh.text(ids, mask)[1], pooled, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_tower_adds_its_special_tokens_and_reads_vlmflows_as_unknown(folders, kind):
    """A caption holding a token vlmflow added to the tokenizer (<image>) reaches the text model as its
    unknown token, inside the folder tokenizer's special tokens, padded with its pad token."""
    folder = folders / FOLDERS[kind]
    model, tokenizer, special = model_of(spec_of(folders, kind), folder)
    ids, mask = text_batch(tokenizer, special, ["a <image> circle", "a circle"])
    full, full_mask, _ = model.text.model_inputs(ids, mask)
    own = AutoTokenizer.from_pretrained(str(folder))
    wrapped = own("a circle")["input_ids"]  # the folder tokenizer's own special tokens around "a circle"
    first = wrapped.index(own.convert_tokens_to_ids("a"))
    unknown = [*wrapped[: first + 1], own.convert_tokens_to_ids(own.unk_token), *wrapped[first + 1 :]]
    pad = own.convert_tokens_to_ids(own.pad_token)
    width = full.shape[1]
    assert width == (model.text.positions if kind == "hf-siglip-text" else len(unknown))
    assert full.tolist() == [unknown + [pad] * (width - len(unknown)), wrapped + [pad] * (width - len(wrapped))]
    assert full_mask.sum(dim=1).tolist() == [len(model.text.prefix) + n + len(model.text.suffix) for n in (3, 2)]


def test_the_folders_projection_sets_the_shared_embedding_size(folders):
    with pytest.raises(UserError, match=rf"model\.embed_dim: 16, .* set embed_dim: {PROJECTION}"):
        model_of(spec_of(folders, "hf-clip-text").model_copy(update={"embed_dim": 16}), folders / "clip-text")


def shapes_batch(tokenizer, special: dict, count: int = 16) -> dict[str, torch.Tensor]:
    source = SyntheticShapesSource(kind="synthetic-shapes", count=count, image_size=32)
    rows = [make_row(source, 3, i) for i in range(count)]
    image = ImageSpec(32, CLIP_MEAN, CLIP_STD)
    ids, mask = text_batch(tokenizer, special, [r.captions[0] for r in rows])
    pixels = torch.stack([torch.from_numpy(preprocess(r.image, image)) for r in rows])
    return {"pixels": pixels, "text_ids": ids, "text_mask": mask}


@pytest.mark.parametrize(("kind", "objectives"), [("hf-clip-text", ["itc"]), ("hf-bert", ["itc", "itm"]),
                                                  ("hf-siglip-text", ["siglip"])])  # fmt: skip
def test_contrastive_training_with_a_pretrained_tower_lowers_the_loss(folders, kind, objectives):
    spec = spec_of(folders, kind, match_layers=2)
    tokenizer, special = recipe_tokenizer(folders / FOLDERS[kind])
    kinds = [{"kind": k} for k in objectives]
    stage = TrainStageSpec(name="s", trainable=["vision", "text", "heads"], objectives=kinds, micro_batch_size=8)
    torch.manual_seed(0)
    model = build_stage_model(spec, Vocab(tokenizer.get_vocab_size(), special), stage, None)
    batch = shapes_batch(tokenizer, special, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    losses = []
    for step in range(32):
        torch.manual_seed(step)  # ITM negatives
        loss = sum(model(batch, objectives).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("kind", KINDS)
def test_sharding_and_checkpointing_wrap_the_towers_layers(folders, kind):
    spec = spec_of(folders, kind)
    tokenizer, special = recipe_tokenizer(folders / FOLDERS[kind])
    vocab = Vocab(tokenizer.get_vocab_size(), special)
    encoder = VLM(spec, vocab).text.model.encoder
    layers = list(encoder.layer if kind == "hf-bert" else encoder.layers)
    assert len(layers) == 2
    objectives = [{"kind": "itc"}, {"kind": "itm"}]
    batch = shapes_batch(tokenizer, special, 8)
    losses = []
    for checkpointing in (False, True):
        stage = TrainStageSpec(name="s", trainable=["text", "heads"], objectives=objectives, micro_batch_size=8,
                               activation_checkpointing=checkpointing)  # fmt: skip
        torch.manual_seed(0)
        model = build_stage_model(spec, vocab, stage, None)
        blocks = transformer_blocks(model)
        encoder = model.text.model.encoder
        wrapped = list(encoder.layer if kind == "hf-bert" else encoder.layers)
        assert all(any(layer is block for block in blocks) for layer in wrapped)
        if checkpointing:
            assert all(type(layer).__name__ == "CheckpointWrapper" for layer in wrapped)
        torch.manual_seed(1)
        loss = sum(model(batch, ["itc", "itm"]).values())
        loss.backward()
        grad = model.text.model.embeddings.position_embedding.weight.grad if kind != "hf-bert" else (
            model.text.model.embeddings.position_embeddings.weight.grad)  # fmt: skip
        losses.append((float(loss.detach()), grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-6)
    assert torch.allclose(losses[0][1], losses[1][1], atol=1e-6)


def test_clip_tiny_pointed_at_a_local_clip_text_validates_and_plans(folders, tmp_path):
    shutil.copytree(folders / "clip-text", tmp_path / "clip-text")
    spec = tmp_path / "clip-tiny.yaml"
    shutil.copyfile(RECIPES / "clip-tiny.yaml", spec)
    tower = ["--set", "model.text={kind: hf-clip-text, path: clip-text, max_length: 32}", "--set",
             f"model.embed_dim={PROJECTION}"]  # fmt: skip
    own = ["--set", "tokenizer={kind: pretrained, path: clip-text}"]
    runner = CliRunner()
    result = runner.invoke(cli, ["validate", str(spec), *tower])
    assert result.exit_code != 0
    assert (
        "tokenizer.kind: model.text is a pretrained hf-clip-text tower: feed it its own tokenizer's ids"
        in result.output
    )
    result = runner.invoke(cli, ["validate", str(spec), *tower, *own])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["plan", str(spec), "--workdir", str(tmp_path / "work"), "--json", *tower, *own])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    (train,) = [s["train"] for s in plan["stages"] if "train" in s]
    assert train["problem"] is None and "unknown" not in train, train
    params = train["trace"]["params"]
    saved = CLIPTextModelWithProjection.from_pretrained(str(folders / "clip-text"))
    assert params["text_total"] == sum(p.numel() for p in saved.text_model.parameters())
    assert params["heads_total"] > saved.text_projection.weight.numel()  # the projection is the head's


def test_a_recipe_cannot_feed_one_tokenizer_to_an_hf_lm_and_another_hf_text_tower(folders, tmp_path):
    shutil.copytree(folders / "bert", tmp_path / "bert")
    (tmp_path / "lm").mkdir()
    spec = tmp_path / "blip-tiny.yaml"
    shutil.copyfile(RECIPES / "blip-tiny.yaml", spec)
    sets = ["model.text={kind: hf-bert, path: bert}", "model.language={kind: hf-causal-lm, path: lm}",
            "tokenizer={kind: pretrained, path: bert}"]  # fmt: skip
    result = CliRunner().invoke(cli, ["validate", str(spec), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code != 0
    assert (
        "model.text.path: model.text (hf-bert" in result.output
        and "read the ids of different tokenizers" in result.output
    )


def test_captions_of_the_tiny_folders_are_tokenised_whole(folders):
    """The tiny tokenizers know every word of the synthetic captions (the tests' texts are not <unk>)."""
    tokenizer, _ = recipe_tokenizer(folders / "bert")
    unk = tokenizer.token_to_id("[UNK]")
    assert all(unk not in tokenizer.encode(c, add_special_tokens=False).ids for c in captions(64, seed=3))
