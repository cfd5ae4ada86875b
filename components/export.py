"""Export a trained model to a Hugging Face `LlavaForConditionalGeneration` folder.

LLaVA-family models export: a CLIP- or SigLIP-style vision tower, a `linear` or 2-layer
`mlp` connector (HF's projector is linear_1 -> GELU -> linear_2; `linear` becomes
linear_1 with an identity linear_2 and a linear activation), and a Llama-style causal LM.
Everything else cannot be expressed by that class and is refused with the reason.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import PILImageResampling

from vlmflow.chat import ChatFormat, jinja_template
from vlmflow.components.train.checkpoint import is_checkpoint
from vlmflow.components.train.data import own_format
from vlmflow.components.train.setup import (
    CHECKPOINT_CONFIG,
    CONFIG_FILE,
    TOKENIZER_FILE,
    model_from_checkpoint,
    read_model_folder,
    write_model_folder,
)
from vlmflow.errors import UserError
from vlmflow.models.vlm import VLM
from vlmflow.runs import run_folder

RENAMES = (("vision.model.", "model.vision_tower."), ("language.model.", "model.language_model."),
           ("language.lm_head.", "lm_head."))  # fmt: skip


def export_problems(model: VLM) -> list[str]:
    """Why this model cannot be a LlavaForConditionalGeneration (empty: it can)."""
    spec, problems = model.spec, []
    if spec.vision.kind == "none":
        problems.append("vision none (Fuyu-style patch-linear) has no vision tower for LLaVA")
    if spec.connector is None or spec.connector.kind not in ("linear", "mlp"):
        kind = spec.connector.kind if spec.connector else "none"
        problems.append(f"connector {kind}: LLaVA's projector is linear or a 2-layer GELU MLP")
    elif spec.connector.kind == "mlp" and spec.connector.layers != 2:
        problems.append(f"connector mlp with {spec.connector.layers} layers: LLaVA's projector has 2")
    if spec.language is None:
        problems.append("no language model")
    elif model.language.config.model_type != "llama":  # tiny-llama is a LlamaConfig too
        problems.append(f"language model type {model.language.config.model_type}: only Llama-style LMs are exported")
    return problems


def llava_config(model: VLM) -> LlavaConfig:
    vision, connector = model.vision, model.spec.connector
    return LlavaConfig(
        vision_config=vision.model.config.to_dict(),
        text_config=model.language.config.to_dict(),
        image_token_id=model.vocab.image_id,
        vision_feature_layer=vision.feature_layer,
        vision_feature_select_strategy="default" if vision.drop_cls else "full",
        projector_hidden_act="gelu" if connector.kind == "mlp" else "linear",
        image_seq_length=model.num_image_tokens,
        multimodal_projector_bias=True,
    )


def export_tokenizer(config: dict, tokenizer_file: Path) -> tuple[PreTrainedTokenizerFast, ChatFormat]:
    """The model's tokenizer with its special tokens and, as its chat_template, the conversation
    template the model was trained in (the model folder's `chat`; vlmflow's for a folder of before):
    the processor called on the rendered text gives the ids vlmflow trained on. The bos token is
    written by the template only where the tokenizer does not add it itself (a Llama tokenizer does)."""
    plain = Tokenizer.from_file(str(tokenizer_file))
    special = config["vocab"]["special"]
    chat = ChatFormat.of(config["chat"]) if config.get("chat") else own_format(plain, special)
    token = {role: plain.id_to_token(i) for role, i in special.items()}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=chat.tokens.bos,
        eos_token=chat.tokens.eos,
        pad_token=token["<pad>"],
        unk_token=token.get("<unk>"),
        extra_special_tokens={"image_token": chat.tokens.image},
        padding_side="left",  # batched generation
    )
    adds_bos = chat.tokens.bos is not None and tokenizer("a")["input_ids"][:1] == [plain.token_to_id(chat.tokens.bos)]
    tokenizer.chat_template = jinja_template(chat, bos_in_text=not adds_bos)
    return tokenizer, chat


def llava_processor(model: VLM, config: dict, tokenizer_file: Path) -> LlavaProcessor:
    """A LlavaProcessor that prepares inputs exactly as vlmflow does: `export_tokenizer`, and a
    CLIPImageProcessor doing vlmflow's preprocessing (RGB, bicubic resize to the square size, no crop,
    rescale to [0, 1], normalise)."""
    image = config["image"]
    size = int(image["size"])
    images = CLIPImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(image["mean"]),
        image_std=list(image["std"]),
        do_convert_rgb=True,
    )
    tokenizer, chat = export_tokenizer(config, tokenizer_file)
    vision = model.vision
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default" if vision.drop_cls else "full",
        num_additional_image_tokens=1 if vision.has_cls else 0,
        chat_template=tokenizer.chat_template,
        image_token=chat.tokens.image,
    )


def llava_state(model: VLM) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        for old, new in RENAMES:
            if key.startswith(old):
                state[new + key[len(old) :]] = value
    projector = "model.multi_modal_projector."
    if model.spec.connector.kind == "mlp":
        first, second = model.connector.layers[0], model.connector.layers[2]
        state |= {projector + "linear_1.weight": first.weight, projector + "linear_1.bias": first.bias}
        state |= {projector + "linear_2.weight": second.weight, projector + "linear_2.bias": second.bias}
    else:
        proj = model.connector.proj
        width = proj.weight.shape[0]
        state |= {projector + "linear_1.weight": proj.weight, projector + "linear_1.bias": proj.bias}
        state |= {projector + "linear_2.weight": torch.eye(width), projector + "linear_2.bias": torch.zeros(width)}
    return state


@contextmanager
def resolve_model(run: str, workdir: Path) -> Iterator[Path]:
    """The model folder RUN names: a model folder, a stage folder, a run folder or run id (its
    last training stage), or a checkpoint folder (merged into a temporary model folder)."""
    path = Path(run)
    if not path.exists():
        path = run_folder(run, workdir)  # a run id, `latest` or an MLflow run id (else a clear error)
    if (path / CONFIG_FILE).is_file():
        yield path
    elif (path / "model" / CONFIG_FILE).is_file():
        yield path / "model"
    elif (path / "summary.json").is_file():
        yield last_trained_model(path / "summary.json")
    elif is_checkpoint(path) and (path.parent / CHECKPOINT_CONFIG).is_file():
        model, config = model_from_checkpoint(path)
        with tempfile.TemporaryDirectory(prefix="vlmflow-export-") as tmp:
            tokenizer = path.parent / TOKENIZER_FILE
            folder = Path(tmp) / "model"
            write_model_folder(folder, model.state_dict(), config, tokenizer if tokenizer.is_file() else None)
            yield folder
    else:
        raise UserError(f"{run}: not a run id in {workdir / 'runs'}, a run folder, a model folder or a checkpoint")


def _is_training(entry: dict) -> bool:
    """A training stage's entry (summaries before 2026-12-03 name no component: by its name)."""
    return entry.get("component", "train" if entry["name"].startswith("train-") else None) == "train"


def last_trained_model(summary_file: Path) -> Path:
    summary = json.loads(summary_file.read_text())
    trained = [s for s in summary["stages"] if _is_training(s) and s["status"] in ("computed", "cached")]
    if not trained:
        raise UserError(f"{summary_file}: this run has no finished training stage")
    folder = Path(trained[-1]["artifact_path"]) / "model"
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder}: model folder missing (was the artifact store cleaned?)")
    return folder


def export_hf(model_folder: Path, out: Path) -> list[str]:
    """Write `out` as a LlavaForConditionalGeneration folder; returns notes on what was left out."""
    model, config = read_model_folder(model_folder)
    problems = export_problems(model)
    if problems:
        raise UserError(f"{model_folder}: cannot export to Hugging Face LLaVA: " + "; ".join(problems))
    llava = LlavaForConditionalGeneration(llava_config(model))
    missing, unexpected = llava.load_state_dict(llava_state(model), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(str(out))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    notes = []
    if (model_folder / TOKENIZER_FILE).is_file():
        processor = llava_processor(model, config, model_folder / TOKENIZER_FILE)
        processor.save_pretrained(str(out))  # the chat template in chat_template.jinja
        processor.tokenizer.save_pretrained(str(out), save_jinja_files=False)  # and in tokenizer_config.json
    else:
        notes.append("the model folder has no tokenizer.json: no processor was written (AutoProcessor will fail)")
    if model.text is not None:
        notes.append("the text encoder and itc/itm heads are not part of LLaVA and were left out")
    return notes
