"""BiomedCLIP text tower: BERT laid out like open_clip's ``HFTextEncoder``, plus CoOp context vectors.

BiomedCLIP's text tower is ``HFTextEncoder`` with ``hf_proj_type="mlp"`` and
``hf_pooler_type="cls_last_hidden_state_pooler"``: a transformers ``BertModel`` without its pooling
layer (``transformer.*``), the last hidden state at [CLS], and
``proj = Sequential(Linear(width, (width + embed) // 2), GELU, Linear(.., embed))`` without biases
(``proj.0.weight``, ``proj.2.weight``). The BERT is built from an explicit ``BertConfig``, so nothing
is downloaded.

CoOp: ``ctx`` (n_ctx x width) learnable vectors are spliced into the input embeddings right after
[CLS] ("[CLS] X X .. X text [SEP]"); BERT's position embeddings are then added to every position.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel

from shared_model.config import ClipConfig, ClipTextConfig, ConfigError
from shared_model.lora import add_lora, freeze, linear_names, unfreeze_lora


def bert_config(t: ClipTextConfig) -> BertConfig:
    """The transformers ``BertConfig`` for a text config (BERT defaults for everything not listed)."""
    return BertConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        num_hidden_layers=t.depth,
        num_attention_heads=t.heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        pad_token_id=0,
    )


class ClipText(nn.Module):
    """BERT text encoder with learnable context, CLS pooling and an MLP projection.

    ``ClipText(cfg)`` builds the plain tower; load weights, then call :meth:`add_adapters`.

    Args:
        cfg: The CLIP config (``cfg.text`` sizes and adapters, ``cfg.embed_dim``).
    """

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        t = cfg.text
        if t.width % t.heads:
            raise ConfigError(f"model.clip.text.width: {t.width} is not divisible by heads {t.heads}")
        if t.context_length > t.max_position_embeddings:
            raise ConfigError(
                f"model.clip.text.context_length: {t.context_length} exceeds max_position_embeddings "
                f"{t.max_position_embeddings}"
            )
        if not 0 <= t.n_ctx <= t.context_length - 2:
            raise ConfigError(
                f"model.clip.text.n_ctx: {t.n_ctx} must be in [0, context_length - 2 = {t.context_length - 2}]"
            )
        if not 0 <= t.lora_last_layers <= t.depth:
            raise ConfigError(f"model.clip.text.lora_last_layers: {t.lora_last_layers} is outside [0, depth={t.depth}]")
        self.cfg = cfg
        self.transformer = BertModel(bert_config(t), add_pooling_layer=False)
        hidden = (t.width + cfg.embed_dim) // 2
        self.proj = nn.Sequential(
            nn.Linear(t.width, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, cfg.embed_dim, bias=False),
        )
        if t.n_ctx > 0:
            self.ctx = nn.Parameter(torch.randn(t.n_ctx, t.width) * t.ctx_init_std)
        else:
            self.register_parameter("ctx", None)
        self.adapted = False

    @property
    def n_ctx(self) -> int:
        return 0 if self.ctx is None else self.ctx.shape[0]

    def add_adapters(self) -> None:
        """Freeze BERT and the projection; LoRA on ``lora_targets`` of the last ``lora_last_layers`` layers.

        Trainable afterwards: ``ctx`` and the LoRA A/B matrices. Call once, after loading weights.
        """
        if self.adapted:
            raise RuntimeError("ClipText.add_adapters: adapters were already added")
        t = self.cfg.text
        freeze(self)
        if t.lora_last_layers > 0:
            prefixes = [f"transformer.encoder.layer.{i}." for i in range(t.depth - t.lora_last_layers, t.depth)]
            targets = linear_names(self, t.lora_targets, prefixes)
            if len(targets) != len(t.lora_targets) * t.lora_last_layers:
                raise ConfigError(
                    f"model.clip.text.lora_targets: {t.lora_targets} do not all name Linear layers of a "
                    "BERT layer (valid: query, key, value, dense)"
                )
            add_lora(self, targets, t.lora_rank, t.lora_alpha)
            unfreeze_lora(self)
        if self.ctx is not None:
            self.ctx.requires_grad_(True)
        self.adapted = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode tokenised texts.

        Args:
            input_ids: B x L int64 token ids, ``[CLS]`` first (from :mod:`shared_model.tokenizer`).
            attention_mask: B x L, 1 on real tokens and 0 on padding.

        Returns:
            B x E text embeddings (not normalised).
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"ClipText: expected input_ids and attention_mask of equal shape B x L, got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        batch, length = input_ids.shape
        limit = self.cfg.text.max_position_embeddings
        if length + self.n_ctx > limit:
            raise ValueError(
                f"ClipText: {length} tokens + {self.n_ctx} context vectors exceed max_position_embeddings {limit}"
            )
        vocab = self.cfg.text.vocab_size
        if input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
            raise ValueError(f"ClipText: token ids must lie in [0, vocab_size={vocab})")
        embeds = self.transformer.embeddings.word_embeddings(input_ids)
        mask = attention_mask.to(torch.long)
        if self.ctx is not None:
            ctx = self.ctx.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            embeds = torch.cat([embeds[:, :1], ctx, embeds[:, 1:]], dim=1)
            ones = mask.new_ones(batch, self.n_ctx)
            mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
        hidden = self.transformer(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return self.proj(hidden[:, 0])
