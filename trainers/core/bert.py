"""BERT pieces shared by the PyTorch families built on transformers' BERT blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from trainers.core.configs import BertTextConfig


def bert_config(text: BertTextConfig, **overrides: Any) -> BertConfig:
    """A transformers BertConfig for our text config (`overrides` set any BertConfig attribute)."""
    cfg = BertConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        intermediate_size=text.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=text.hidden_dropout_prob,
        attention_probs_dropout_prob=text.attention_probs_dropout_prob,
        max_position_embeddings=text.max_position_embeddings,
        type_vocab_size=text.type_vocab_size,
        layer_norm_eps=text.layer_norm_eps,
        initializer_range=text.initializer_range,
        pad_token_id=text.pad_token_id,
        attn_implementation="sdpa",
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std) weights, zero biases, unit LayerNorm), for modules built
    outside a `PreTrainedModel` (which would otherwise keep PyTorch's default init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, BertOnlyMLMHead):
            nn.init.zeros_(m.predictions.bias)
