"""Language side: a tiny Llama from a config or a causal LM from a local HF folder, and a small
bidirectional text encoder for contrastive / matching objectives."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from vlmflow.errors import UserError
from vlmflow.specs.model import HfCausalLm, TinyLlama, TinyTextEncoder


def build_language(
    spec: TinyLlama | HfCausalLm, vocab_size: int, special: dict[str, int], load_weights: bool = True
) -> PreTrainedModel:
    """load_weights=False builds a local model from its config.json alone (shapes for `vlmflow plan`)."""
    if isinstance(spec, TinyLlama):
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads or spec.heads,
            max_position_embeddings=spec.max_positions,
            pad_token_id=special["<pad>"],
            bos_token_id=special.get("<bos>"),  # a pretrained tokenizer may have none (SigLIP's)
            eos_token_id=special["<eos>"],
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)
    if not (spec.path / "config.json").is_file():
        raise UserError(f"model.language.path: {spec.path} is not a Hugging Face model folder (no config.json)")
    if load_weights:
        model = AutoModelForCausalLM.from_pretrained(str(spec.path), local_files_only=True, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(str(spec.path), local_files_only=True)
        config.vocab_size = max(config.vocab_size, vocab_size)  # shapes only: no embeddings to resize
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


class TextEncoder(nn.Module):
    """Token + learned position embeddings, pre-norm transformer encoder, masked mean pooling."""

    def __init__(self, spec: TinyTextEncoder, vocab_size: int, pad_id: int):
        super().__init__()
        self.max_length = spec.max_length
        self.hidden_size, self.heads = spec.hidden_size, spec.heads
        self.tokens = nn.Embedding(vocab_size, spec.hidden_size, padding_idx=pad_id)
        self.positions = nn.Embedding(spec.max_length, spec.hidden_size)
        layer = nn.TransformerEncoderLayer(
            spec.hidden_size, spec.heads, 4 * spec.hidden_size, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.hidden_size)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [B, L, H], pooled [B, H]) for token ids and a 1/0 attention mask."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions)
        hidden = self.norm(self.encoder(x, src_key_padding_mask=mask == 0))
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return hidden, pooled
