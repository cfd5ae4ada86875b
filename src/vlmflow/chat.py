"""Conversation templates: a list of turns -> the prompt text and the spans an LM learns.

The named templates write LLaVA's published formats byte for byte (llava/conversation.py:
`plain`, `vicuna_v1`; LLaVA-NeXT: `llama_3`, `chatml` as its Qwen template); `vlmflow` is the
format of vlmflow's own tokenizers (`<|user|>` … `<|assistant|>` answer `<eos>`); `model` is the
tokenizer folder's own `chat_template`, rendered by transformers' Jinja renderer.

The image goes where LLaVA puts it: `<image>` is taken out of every turn and opens the first user
turn as `<image>\\n` (`plain` keeps the image alone and drops the user's text, as LLaVA's stage 1).
Only assistant turns are learned: `Rendered.learned` holds their character spans, the answer
and the turn's end marker (`eos`, `<|eot_id|>`, `<|im_end|>`; `plain`: the caption and its "\\n").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

TemplateName = Literal["vlmflow", "plain", "vicuna_v1", "llama_3", "chatml", "model"]
TEMPLATES: tuple[str, ...] = get_args(TemplateName)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."
BOS_BEFORE = ("vlmflow", "plain", "vicuna_v1")  # the bos token precedes their text (a Llama tokenizer adds it)
# Tokens a template writes that must be single tokens of the tokenizer (besides bos and eos).
REQUIRED = {
    "vlmflow": ("<|user|>", "<|assistant|>"),
    "llama_3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}


@dataclass(frozen=True)
class ChatTokens:
    """The tokenizer's own token strings the templates write."""

    eos: str
    bos: str | None = None
    image: str = "<image>"


@dataclass(frozen=True)
class Rendered:
    text: str
    learned: tuple[tuple[int, int], ...]  # [start, end) character spans of the assistant turns
    bos: bool  # the bos token precedes the text (it is not in it), as a tokenizer adding it would


def place_image(turns: list[dict], image: str = "<image>") -> list[dict]:
    """User and assistant turns with the image token taken out and put before the first user text."""
    placed, done = [], False
    for turn in turns:
        if turn.get("role") not in ("user", "assistant"):
            continue
        content = str(turn.get("content") or "").replace(image, "").strip()
        if turn["role"] == "user" and not done:
            content, done = f"{image}\n{content}", True
        placed.append({"role": turn["role"], "content": content})
    return placed


def stop_text(template: str, tokens: ChatTokens) -> str:
    """What ends an assistant turn, so generation stops there."""
    return {"plain": "\n", "llama_3": "<|eot_id|>", "chatml": "<|im_end|>"}.get(template, tokens.eos)


def render(
    template: str,
    turns: list[dict],
    tokens: ChatTokens,
    generation: bool = False,
    chat_template: str | None = None,
) -> Rendered:
    """The conversation in `template`; `generation`: end with the cue for the assistant's answer."""
    turns = place_image(turns, tokens.image)
    if template == "model":
        if not chat_template:
            raise ValueError("template model: the tokenizer has no chat_template")
        return _render_model(chat_template, turns, tokens, generation)
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATES)}")
    pieces = _PIECES[template](turns, tokens, generation)
    text, learned = "", []
    for piece, is_learned in pieces:
        if is_learned:
            learned.append((len(text), len(text) + len(piece)))
        text += piece
    return Rendered(text, tuple(learned), bos=template in BOS_BEFORE)


Pieces = list[tuple[str, bool]]


def _vlmflow(turns: list[dict], tokens: ChatTokens, generation: bool) -> Pieces:
    out: Pieces = []
    for turn in turns:
        if turn["role"] == "user":
            out.append((f"<|user|>{turn['content']}<|assistant|>", False))
        else:
            out.append((turn["content"] + tokens.eos, True))
    return out


def _plain(turns: list[dict], tokens: ChatTokens, generation: bool) -> Pieces:
    return [(tokens.image, False)] + [(t["content"] + "\n", True) for t in turns if t["role"] == "assistant"]


def _vicuna_v1(turns: list[dict], tokens: ChatTokens, generation: bool) -> Pieces:
    out: Pieces = [(VICUNA_SYSTEM + " ", False)]
    for turn in turns:
        if turn["role"] == "user":
            out.append((f"USER: {turn['content']} ", False))
        else:
            out += [("ASSISTANT: ", False), (turn["content"] + tokens.eos, True)]
    return out + ([("ASSISTANT:", False)] if generation else [])


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _llama_3(turns: list[dict], tokens: ChatTokens, generation: bool) -> Pieces:
    out: Pieces = [(f"{tokens.bos or ''}{_header('system')}{LLAMA_3_SYSTEM}<|eot_id|>", False)]
    for turn in turns:
        if turn["role"] == "user":
            out.append((f"{_header('user')}{turn['content']}<|eot_id|>", False))
        else:
            out += [(_header("assistant"), False), (turn["content"] + "<|eot_id|>", True)]
    return out + ([(_header("assistant"), False)] if generation else [])


def _chatml(turns: list[dict], tokens: ChatTokens, generation: bool) -> Pieces:
    out: Pieces = [(f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n", False)]
    for turn in turns:
        if turn["role"] == "user":
            out.append((f"<|im_start|>user\n{turn['content']}<|im_end|>\n", False))
        else:
            out += [("<|im_start|>assistant\n", False), (turn["content"] + "<|im_end|>", True), ("\n", False)]
    return out + ([("<|im_start|>assistant\n", False)] if generation else [])


_PIECES = {"vlmflow": _vlmflow, "plain": _plain, "vicuna_v1": _vicuna_v1, "llama_3": _llama_3, "chatml": _chatml}


def _jinja(chat_template: str, turns: list[dict], tokens: ChatTokens, generation: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    specials = {"bos_token": tokens.bos or "", "eos_token": tokens.eos}
    rendered, _ = render_jinja_template(
        [turns], chat_template=chat_template, add_generation_prompt=generation, **specials
    )
    return rendered[0]


def _render_model(chat_template: str, turns: list[dict], tokens: ChatTokens, generation: bool) -> Rendered:
    """The tokenizer's own template; an assistant turn's span is what rendering it adds to the
    conversation before it with the generation cue (the template must render prefixes stably)."""
    learned = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _jinja(chat_template, turns[:i], tokens, True)
        upto = _jinja(chat_template, turns[: i + 1], tokens, False)
        if not upto.startswith(before):
            raise ValueError(
                "the tokenizer's chat_template renders a conversation's start differently once it goes on: "
                "its assistant turns cannot be found; name a template (plain, vicuna_v1, llama_3, chatml)"
            )
        learned.append((len(before), len(upto)))
    return Rendered(_jinja(chat_template, turns, tokens, generation), tuple(learned), bos=False)


@dataclass(frozen=True)
class ChatFormat:
    """A template with the tokenizer's token strings (and, for `model`, its Jinja chat_template):
    what a training stage writes into its model folder, so evaluation and export prompt alike."""

    template: str
    tokens: ChatTokens
    chat_template: str | None = None

    def render(self, turns: list[dict], generation: bool = False) -> Rendered:
        return render(self.template, turns, self.tokens, generation, self.chat_template)

    def missing(self, tokenizer: object) -> list[str]:
        """Tokens the template writes that `tokenizer` (a `tokenizers.Tokenizer`) lacks as single tokens."""
        wanted = [self.tokens.eos, self.tokens.image, *REQUIRED.get(self.template, ())]
        wanted += [self.tokens.bos] if self.tokens.bos and self.template != "chatml" else []
        return [t for t in wanted if tokenizer.token_to_id(t) is None]

    def as_dict(self) -> dict:
        tokens = {"bos": self.tokens.bos, "eos": self.tokens.eos, "image": self.tokens.image}
        return {"template": self.template, "tokens": tokens, "chat_template": self.chat_template}

    @classmethod
    def of(cls, data: dict) -> ChatFormat:
        return cls(data["template"], ChatTokens(**data["tokens"]), data.get("chat_template"))


def resolve(template: str, tokenizer_chat: dict, has_token: object) -> ChatFormat:
    """A stage's format from its `template` and the tokenizer stage's chat.json. `auto`: the
    tokenizer's own chat_template if it has one, else `vlmflow` when `<|user|>` and `<|assistant|>`
    are its tokens (vlmflow's BPE tokenizers), else `vicuna_v1` (LLaVA's)."""
    own = tokenizer_chat.get("chat_template")
    if template == "auto":
        if own:
            template = "model"
        elif all(has_token(t) for t in REQUIRED["vlmflow"]):
            template = "vlmflow"
        else:
            template = "vicuna_v1"
    return ChatFormat(template, ChatTokens(**tokenizer_chat["tokens"]), own if template == "model" else None)


_SYSTEMS = {"vicuna_v1": VICUNA_SYSTEM, "llama_3": LLAMA_3_SYSTEM, "chatml": CHATML_SYSTEM}
# Jinja pieces per named template: (start, user turn, assistant turn, generation cue); `text` is the turn's text.
_JINJA = {
    "vlmflow": ("", "<|user|>{{ text }}<|assistant|>", "{{ text }}{{ eos_token }}", ""),
    "plain": ("{{ image }}", "", "{{ text }}\n", ""),
    "vicuna_v1": ("{{ system }} ", "USER: {{ text }} ", "ASSISTANT: {{ text }}{{ eos_token }}", "ASSISTANT:"),
    "llama_3": (
        "{{ bos_token }}" + _header("system") + "{{ system }}<|eot_id|>",
        _header("user") + "{{ text }}<|eot_id|>",
        _header("assistant") + "{{ text }}<|eot_id|>",
        _header("assistant"),
    ),
    "chatml": (
        "<|im_start|>system\n{{ system }}<|im_end|>\n",
        "<|im_start|>user\n{{ text }}<|im_end|>\n",
        "<|im_start|>assistant\n{{ text }}<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
}


def jinja_template(chat: ChatFormat, bos_in_text: bool) -> str:
    """A Hugging Face chat_template (Jinja) rendering what `chat.render` does: a turn's content is
    a string (the image token taken out) or a list of {"type": "image"} / {"type": "text"} items;
    the image token opens the first user turn. `bos_in_text`: it starts with the bos token (for a
    tokenizer that does not add it itself)."""
    if chat.template == "model":
        return chat.chat_template
    start, user, assistant, cue = _JINJA[chat.template]
    image = chat.tokens.image
    return (
        f"{{% set image = {image!r} %}}{{% set system = {_SYSTEMS.get(chat.template, '')!r} %}}"
        + ("{{ bos_token }}" if bos_in_text and chat.template in BOS_BEFORE else "")
        + start
        + "{% set ns = namespace(image_placed=false) %}{% for message in messages %}"
        "{% if message['content'] is string %}{% set text = message['content'].replace(image, '') | trim %}"
        "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join(' ') | trim %}{% endif %}"
        "{% if message['role'] == 'user' and not ns.image_placed %}"
        "{% set text = image + '\\n' + text %}{% set ns.image_placed = true %}{% endif %}"
        f"{{% if message['role'] == 'user' %}}{user}{{% elif message['role'] == 'assistant' %}}{assistant}{{% endif %}}"
        f"{{% endfor %}}{{% if add_generation_prompt %}}{cue}{{% endif %}}"
    )
