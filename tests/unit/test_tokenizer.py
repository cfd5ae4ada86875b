"""Tokenizer: BPE training on corpus text, special tokens, round trip, pretrained loading."""

from __future__ import annotations

import pytest

from vlmflow.components.tokenize import load_pretrained, round_trip_rate, sample_texts, train_bpe
from vlmflow.errors import UserError
from vlmflow.specs.recipe import DEFAULT_SPECIAL_TOKENS, BpeTokenizer, PretrainedTokenizer

TEXTS = [
    "an image with a red circle and two blue squares.",
    "How many circles are there?",
    "What color is the triangle? purple",
    "Describe the image in detail: 日本語 and émoji 🙂 survive byte-level BPE.",
] * 50


def test_bpe_round_trips_and_has_the_vlm_special_tokens():
    tokenizer = train_bpe(TEXTS, BpeTokenizer(kind="bpe", vocab_size=400, min_frequency=2))
    assert round_trip_rate(tokenizer, TEXTS) == 1.0
    ids = {t: tokenizer.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS}
    assert all(i is not None for i in ids.values())
    assert sorted(ids.values()) == list(range(len(DEFAULT_SPECIAL_TOKENS)))  # specials come first
    encoded = tokenizer.encode("<image> an image with a red circle")
    assert encoded.ids[0] == ids["<image>"]
    assert 256 < tokenizer.get_vocab_size() <= 400


def test_training_is_deterministic():
    spec = BpeTokenizer(kind="bpe", vocab_size=400, min_frequency=2)
    assert train_bpe(TEXTS, spec).to_str() == train_bpe(TEXTS, spec).to_str()


def test_pretrained_with_listed_special_tokens_adds_the_missing_ones(tmp_path):
    base = train_bpe(TEXTS, BpeTokenizer(kind="bpe", vocab_size=300, special_tokens=["<pad>"]))
    (tmp_path / "tok").mkdir()
    base.save(str(tmp_path / "tok" / "tokenizer.json"))
    spec = PretrainedTokenizer.model_validate(
        {"kind": "pretrained", "path": "tok", "special_tokens": DEFAULT_SPECIAL_TOKENS}, context={"spec_dir": tmp_path}
    )
    loaded, special, chat = load_pretrained(spec)
    assert loaded.token_to_id("<pad>") == base.token_to_id("<pad>") == special["<pad>"]
    assert loaded.token_to_id("<image>") == special["<image>"] is not None
    assert chat == {"tokens": {"bos": "<bos>", "eos": "<eos>", "image": "<image>"}, "chat_template": None}
    assert round_trip_rate(loaded, TEXTS) == 1.0


def test_unreadable_pretrained_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    spec = PretrainedTokenizer.model_validate(
        {"kind": "pretrained", "path": "tokenizer.json", "special_tokens": ["<image>"]}, context={"spec_dir": tmp_path}
    )
    with pytest.raises(UserError, match=r"tokenizer\.json"):
        load_pretrained(spec)
    own = PretrainedTokenizer.model_validate({"kind": "pretrained", "path": "."}, context={"spec_dir": tmp_path})
    with pytest.raises(UserError, match="AutoTokenizer cannot load it"):
        load_pretrained(own)


def test_sample_texts_collects_captions_qa_and_turns():
    record = {
        "captions": ["a cat", ""],
        "qa": [{"question": "what?", "answer": "cat"}],
        "conversations": [{"role": "user", "content": "hi"}],
    }
    assert sample_texts(record) == ["a cat", "what?", "cat", "hi"]


def test_a_sentencepiece_only_language_model_keeps_its_own_tokens_and_gains_only_an_image_token(tmp_path):
    from transformers import AutoTokenizer

    from tests.sp_lm import write_sp_folder

    own = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    folder = write_sp_folder(tmp_path / "lm", chat_template=own)
    assert not (folder / "tokenizer.json").exists()
    spec = PretrainedTokenizer.model_validate({"kind": "pretrained", "path": "lm"}, context={"spec_dir": tmp_path})
    tokenizer, special, chat = load_pretrained(spec)
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.get_vocab_size() == len(hf) + 1  # <image>, nothing else
    assert special == {"<bos>": 1, "<eos>": 2, "<unk>": 0, "<pad>": 0, "<image>": len(hf)}  # pad: unk, as LLaVA
    assert chat == {"tokens": {"bos": "<s>", "eos": "</s>", "image": "<image>"}, "chat_template": own}
    text = "a red circle and a blue square."
    assert tokenizer.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False)["input_ids"]

    hf.add_tokens(["<image>"], special_tokens=True)  # a tokenizer with an image token gains nothing
    hf.save_pretrained(str(tmp_path / "with-image"))
    again, special, _ = load_pretrained(spec.model_copy(update={"path": tmp_path / "with-image"}))
    assert again.get_vocab_size() == len(hf) and special["<image>"] == hf.convert_tokens_to_ids("<image>")
