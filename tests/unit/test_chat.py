"""Conversation templates: LLaVA's prompt strings byte for byte, labels on assistant turns only,
the tokenizer's own chat_template, and nothing cut silently (quarantine or an explicit truncate)."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tests.sp_lm import write_sp_folder
from vlmflow.chat import ChatFormat, ChatTokens, jinja_template, place_image, render
from vlmflow.components.tokenize import own_tokenizer
from vlmflow.components.train.data import TextCodec, TooLong
from vlmflow.components.train.overflow import candidate_turns, longest
from vlmflow.models.objectives import IGNORE
from vlmflow.specs.train import TrainStageSpec

LLAMA = ChatTokens(eos="</s>", bos="<s>")
ONE = [{"role": "user", "content": "What color is the circle?\n<image>"}, {"role": "assistant", "content": "red"}]
TWO = [*ONE, {"role": "user", "content": "How many squares?"}, {"role": "assistant", "content": "2"}]
# Written from the published formats (LLaVA llava/conversation.py; LLaVA-NeXT for llama_3 and chatml).
VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
LLAMA_3 = (
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are able "
    "to understand the visual content that the user provides, and assist the user with a variety of tasks using "
    "natural language.<|eot_id|>"
)
EXPECTED = {
    "plain": ("<image>red\n", "<image>red\n2\n", "<image>"),
    "vicuna_v1": (
        f"{VICUNA} USER: <image>\nWhat color is the circle? ASSISTANT: red</s>",
        f"{VICUNA} USER: <image>\nWhat color is the circle? ASSISTANT: red</s>USER: How many squares? ASSISTANT: 2</s>",
        f"{VICUNA} USER: <image>\nWhat color is the circle? ASSISTANT:",
    ),
    "llama_3": (
        f"<s>{LLAMA_3}<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color is the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>",
        f"<s>{LLAMA_3}<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color is the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "How many squares?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>",
        f"<s>{LLAMA_3}<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat color is the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat color is the "
        "circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat color is the "
        "circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nHow many squares?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat color is the "
        "circle?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "vlmflow": (
        "<|user|><image>\nWhat color is the circle?<|assistant|>red</s>",
        "<|user|><image>\nWhat color is the circle?<|assistant|>red</s><|user|>How many squares?<|assistant|>2</s>",
        "<|user|><image>\nWhat color is the circle?<|assistant|>",
    ),
}
LEARNED = {
    "plain": ["red\n", "2\n"],
    "vicuna_v1": ["red</s>", "2</s>"],
    "llama_3": ["red<|eot_id|>", "2<|eot_id|>"],
    "chatml": ["red<|im_end|>", "2<|im_end|>"],
    "vlmflow": ["red</s>", "2</s>"],
}


@pytest.mark.parametrize("template", sorted(EXPECTED))
def test_named_templates_write_the_published_prompts_byte_for_byte(template):
    one, two, prompt = EXPECTED[template]
    assert render(template, ONE, LLAMA).text == one
    rendered = render(template, TWO, LLAMA)
    assert rendered.text == two
    assert [rendered.text[a:b] for a, b in rendered.learned] == LEARNED[template]
    assert render(template, ONE[:1], LLAMA, generation=True).text == prompt
    assert rendered.bos == (template in ("plain", "vicuna_v1", "vlmflow"))  # a Llama tokenizer's <s> precedes


@pytest.mark.parametrize("template", sorted(EXPECTED))
def test_the_exported_jinja_template_renders_the_same_text(template):
    chat = ChatFormat(template, LLAMA)
    for turns, cue in ((ONE, False), (TWO, False), (TWO[:3], True)):
        rendered = chat.render(turns, cue)
        for bos in (True, False):
            (text,), _ = render_jinja_template(
                [turns], chat_template=jinja_template(chat, bos), add_generation_prompt=cue, bos_token="<s>",
                eos_token="</s>",
            )  # fmt: skip
            assert text == ("<s>" if bos and rendered.bos else "") + rendered.text


def test_the_image_opens_the_first_user_turn_wherever_it_was():
    turns = [{"role": "system", "content": "x"}, {"role": "user", "content": "a <image> b"},
             {"role": "assistant", "content": " c "}, {"role": "user", "content": "<image>d"}]  # fmt: skip
    assert place_image(turns) == [{"role": "user", "content": "<image>\na  b"}, {"role": "assistant", "content": "c"},
                                  {"role": "user", "content": "d"}]  # fmt: skip
    with pytest.raises(ValueError, match="unknown conversation template 'v2'"):
        render("v2", ONE, LLAMA)


def test_the_tokenizers_own_chat_template_learns_what_an_assistant_turn_adds():
    own = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rendered = render("model", TWO, LLAMA, chat_template=own)
    assert (
        rendered.text
        == "<s><user><image>\nWhat color is the circle?<assistant>red</s><user>How many squares?<assistant>2</s>"
    )
    assert [rendered.text[a:b] for a, b in rendered.learned] == ["red</s>", "2</s>"] and not rendered.bos
    unstable = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the count first
    with pytest.raises(ValueError, match="cannot be found"):
        render("model", ONE, LLAMA, chat_template=unstable)


@pytest.fixture(scope="module")
def sentencepiece_lm(tmp_path_factory):
    """A SentencePiece-only LM folder loaded as the tokenizer stage loads it."""
    folder = write_sp_folder(tmp_path_factory.mktemp("sp") / "lm")
    tokenizer, special, chat = own_tokenizer(folder)
    path = folder.parent / "tokenizer.json"
    tokenizer.save(str(path))
    return path, special, chat


def test_labels_mask_everything_but_the_assistant_turns(sentencepiece_lm):
    path, special, chat = sentencepiece_lm
    codec = TextCodec(path, special, 3, 200, ChatFormat("vicuna_v1", ChatTokens(**chat["tokens"])))
    ids, labels = codec.chat(TWO)
    assert ids[0] == special["<bos>"] and ids.count(special["<image>"]) == 3
    learned = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert [label for label in labels if label != IGNORE] == learned
    assert codec.tokenizer.decode(learned, skip_special_tokens=False) == "red</s> 2</s>"
    assert learned.count(special["<eos>"]) == 2 and codec.stop_id == special["<eos>"]
    prompt = codec.prompt("What color is the circle?")
    assert prompt == ids[: len(prompt)]  # the prompt is the training text up to the answer
    assert codec.tokenizer.decode(prompt).endswith("What color is the circle? ASSISTANT:")


def test_a_too_long_sample_is_refused_with_its_length_or_cut_when_asked(sentencepiece_lm):
    path, special, chat = sentencepiece_lm
    tokens = ChatTokens(**chat["tokens"])
    long = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "a red circle " * 30}]
    full, _ = TextCodec(path, special, 3, None, ChatFormat("plain", tokens)).chat(long)
    text_tokens = len(full) - 3
    quarantine = TextCodec(path, special, 3, 16, ChatFormat("plain", tokens))
    with pytest.raises(TooLong, match=f"too-long:{text_tokens} tokens > 16"):
        quarantine.chat(long)
    ids, labels = TextCodec(path, special, 3, 16, ChatFormat("plain", tokens), overflow="truncate").chat(long)
    assert ids == full[: 16 + 3] and len(labels) == len(ids)
    spec = TrainStageSpec.model_validate({"name": "s", "trainable": ["connector"], "objectives": [{"kind": "lm"}],
                                          "template": "plain", "max_text_tokens": 16})  # fmt: skip
    record = {"captions": ["a red circle.", "a red circle " * 30], "qa": []}
    assert len(candidate_turns(record, "caption", spec.prompt, spec.choice_template)) == 2
    assert longest(quarantine, record, "caption", spec) == text_tokens  # the second caption
    assert longest(quarantine, {"captions": ["a red circle."]}, "caption", spec) is None


def test_template_plain_takes_captions_only():
    stage = {"name": "s", "trainable": ["connector"], "objectives": [{"kind": "lm"}], "template": "plain"}
    with pytest.raises(ValueError, match=r"template plain .* takes the caption format only"):
        TrainStageSpec.model_validate({**stage, "format": "qa"})
    assert TrainStageSpec.model_validate(stage).model_dump()["template"] == "plain"
    assert "template" not in TrainStageSpec.model_validate({**stage, "template": "auto"}).model_dump(exclude_none=True)
