"""Export to Hugging Face LLaVA: the loaded LlavaForConditionalGeneration gives vlmflow's logits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from vlmflow.components.export import export_hf, export_problems
from vlmflow.components.tokenize import train_bpe
from vlmflow.components.train.data import ImageSpec, TextCodec, preprocess
from vlmflow.components.train.setup import CONFIG_FILE, model_config, read_model_folder, write_model_folder
from vlmflow.errors import UserError
from vlmflow.models.vision import image_spec
from vlmflow.models.vlm import VLM, Vocab
from vlmflow.specs.model import ModelSpec
from vlmflow.specs.recipe import DEFAULT_SPECIAL_TOKENS, BpeTokenizer

SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "<image>": 4, "<|user|>": 6, "<|assistant|>": 7}
VOCAB = Vocab(120, SPECIAL)


def saved_model(
    tmp_path, connector: dict, vision: dict | None = None, vocab: Vocab = VOCAB, tokenizer: Path | None = None
) -> tuple[VLM, Path]:
    spec = ModelSpec.model_validate(
        {
            "vision": vision or {"kind": "tiny-vit", "image_size": 32, "patch_size": 8, "hidden_size": 32},
            "connector": connector,
            "language": {"kind": "tiny-llama", "hidden_size": 32, "heads": 4},
        }
    )
    torch.manual_seed(0)
    model = VLM(spec, vocab)
    with torch.no_grad():  # non-trivial biases so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path / "model"
    config = model_config(spec, vocab, image_spec(spec.vision), model.num_image_tokens)
    write_model_folder(folder, model.state_dict(), config, tokenizer)
    return model, folder


@pytest.mark.parametrize(
    ("connector", "vision"),
    [
        ({"kind": "mlp", "layers": 2}, None),
        ({"kind": "linear"}, None),
        (
            {"kind": "mlp"},
            {"kind": "tiny-vit", "family": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32},
        ),
        ({"kind": "mlp"}, {"kind": "tiny-vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "select": "all"}),
    ],
)
def test_exported_llava_gives_the_same_logits(tmp_path, connector, vision):
    model, folder = saved_model(tmp_path, connector, vision)
    export_hf(folder, tmp_path / "hf")
    llava = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    model.eval()
    tokens = model.num_image_tokens
    ids = torch.tensor([[1, 6, *[4] * tokens, 20, 31, 42, 7, 55, 2]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.lm_logits(ids, torch.ones_like(ids), pixels)
        theirs = llava(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    reloaded, _ = read_model_folder(folder)
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "vision",
    [
        {"kind": "tiny-vit", "image_size": 32, "patch_size": 8, "hidden_size": 32},
        {"kind": "tiny-vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "select": "all"},
        {"kind": "tiny-vit", "family": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32},
    ],
)
def test_exported_processor_prepares_inputs_exactly_as_vlmflow_does(tmp_path, vision):
    """AutoProcessor on the export (what lmms-eval's llava_hf loads): the chat template and the
    image-token expansion give vlmflow's token ids, the image processor its pixels, and the HF
    model its logits on them."""
    texts = ["a red circle and two blue squares.", "How many circles are there? two", "What color is it?"] * 40
    tokenizer = train_bpe(texts, BpeTokenizer(kind="bpe", vocab_size=300, min_frequency=2))
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    vocab = Vocab(tokenizer.get_vocab_size(), {t: tokenizer.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS})
    model, folder = saved_model(tmp_path, {"kind": "mlp", "layers": 2}, vision, vocab, tokenizer_file)
    export_hf(folder, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(processor, LlavaProcessor)

    codec = TextCodec(tokenizer_file, vocab.special, model.num_image_tokens, max_text=64)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)  # not square: resized
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    picture = Image.open(io.BytesIO(buffer.getvalue()))
    question = "What color is the circle?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=picture, text=prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == codec.prompt(question)
    expected = preprocess(buffer.getvalue(), ImageSpec.of(json.loads((folder / CONFIG_FILE).read_text())["image"]))
    assert np.abs(inputs["pixel_values"][0].numpy() - expected).max() < 1e-5

    turns = [
        {"role": "user", "content": "<image>\nHow many circles are there?"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "What color is it?"},
    ]
    text = processor.apply_chat_template(turns)
    assert processor(images=picture, text=text)["input_ids"][0] == codec.chat(turns)[0]

    llava = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    model.eval()
    with torch.no_grad():
        theirs = llava(**inputs).logits
        ids = torch.tensor([codec.prompt(question)])
        ours = model.lm_logits(ids, torch.ones_like(ids), torch.from_numpy(expected)[None])
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize(
    ("connector", "vision", "reason"),
    [
        ({"kind": "qformer", "num_queries": 4, "hidden_size": 32}, None, "connector qformer"),
        ({"kind": "mlp", "layers": 3}, None, "3 layers"),
        ({"kind": "patch-linear"}, {"kind": "none", "image_size": 32, "patch_size": 8}, "vision none"),
    ],
)
def test_architectures_llava_cannot_hold_are_refused_with_the_reason(tmp_path, connector, vision, reason):
    model, folder = saved_model(tmp_path, connector, vision)
    assert any(reason in p for p in export_problems(model))
    with pytest.raises(UserError, match=reason):
        export_hf(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_registered_version_downloads_as_a_model_folder_and_a_missing_one_is_a_clear_error(tmp_path):
    """Real MLflow on sqlite: register a model folder the way a run does, fetch it back by models:/."""
    from vlmflow.tracking import Tracker, download_model, tracking_uri

    _, folder = saved_model(tmp_path, {"kind": "mlp", "layers": 2})
    uri = tracking_uri(tmp_path, None)
    tracker = Tracker(uri, "exp", tmp_path / "mlartifacts")
    run = tracker.start("train-x", {})
    tracker.client.log_artifacts(run, str(folder), "model")
    version = tracker.register_model(run, "tiny", "model", {})
    local = download_model(f"models:/tiny/{version}", uri, tmp_path / "fetched")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in folder.iterdir())
    read_model_folder(local)  # a complete model folder
    with pytest.raises(UserError, match=r"cannot load models:/tiny/7 from sqlite:"):
        download_model("models:/tiny/7", uri, tmp_path / "nothing")


def test_the_export_carries_the_models_conversation_template_and_tokenizer(tmp_path):
    """A model trained in vicuna_v1 on a SentencePiece LM's own tokenizer: the exported processor's
    chat template (also in tokenizer_config.json) and tokenizer give the ids vlmflow trained on;
    the Llama tokenizer adds <s> itself, so the template does not write it."""
    from tests.sp_lm import write_sp_folder
    from vlmflow.chat import ChatFormat, ChatTokens
    from vlmflow.components.tokenize import own_tokenizer

    tokenizer, special, chat = own_tokenizer(write_sp_folder(tmp_path / "lm"))
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    vocab = Vocab(tokenizer.get_vocab_size(), special)
    model, folder = saved_model(tmp_path, {"kind": "mlp", "layers": 2}, None, vocab, tokenizer_file)
    vicuna = ChatFormat("vicuna_v1", ChatTokens(**chat["tokens"]))
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "chat": vicuna.as_dict()}))
    export_hf(folder, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "USER: " in saved["chat_template"] and "bos_token" not in saved["chat_template"]
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    codec = TextCodec(tokenizer_file, special, model.num_image_tokens, None, vicuna)
    picture = Image.new("RGB", (32, 32), "red")
    question = "What color is the circle?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith(f"USER: <image>\n{question} ASSISTANT:")
    assert processor(images=picture, text=prompt)["input_ids"][0] == codec.prompt(question)
    turns = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "How many squares?"}, {"role": "assistant", "content": "2"}]  # fmt: skip
    assert processor(images=picture, text=processor.apply_chat_template(turns))["input_ids"][0] == codec.chat(turns)[0]
