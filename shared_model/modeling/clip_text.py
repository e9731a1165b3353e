"""BiomedCLIP text tower: open_clip's ``HFTextEncoder`` (BERT, pooler, projection) plus CoOp context vectors.

:class:`ClipText` holds the ``transformer``, ``pooler`` and ``proj`` of the open_clip model's ``text`` tower
(so the parameter names are open_clip's ``text.*`` without the prefix) and adds what open_clip lacks:
``ctx`` (n_ctx x width) learnable vectors spliced into the input embeddings right after [CLS]
("[CLS] X X .. X text [SEP]"; BERT's position embeddings are then added to every position), and LoRA.
"""

from __future__ import annotations

import torch
from open_clip.hf_model import HFTextEncoder
from torch import nn

from shared_model.config import ClipConfig, ConfigError
from shared_model.modeling.lora import add_lora, freeze, linear_names, unfreeze_lora


class ClipText(nn.Module):
    """BERT text encoder with learnable context, open_clip's pooling and projection.

    Args:
        text: The ``text`` tower of an open_clip model built for ``cfg`` (see
            :func:`shared_model.modeling.biomedclip.create_open_clip`); its modules are shared, not copied.
        cfg: The CLIP config (``cfg.text`` sizes and adapters).
    """

    def __init__(self, text: HFTextEncoder, cfg: ClipConfig):
        super().__init__()
        t = cfg.text
        self.cfg = cfg
        self.transformer, self.pooler, self.proj = text.transformer, text.pooler, text.proj
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vmappable: bool = False) -> torch.Tensor:
        """Encode tokenised texts.

        Args:
            input_ids: B x L int64 token ids, ``[CLS]`` first (from :mod:`shared_model.modeling.tokenizer`).
            attention_mask: B x L, 1 on real tokens and 0 on padding.
            vmappable: Read no value back to the host, so that ``torch.func.vmap`` can map the
                call: the ids' range is not checked (the caller did: :meth:`check_token_ids`) and
                the attention mask goes to the transformer as the 4D mask it would build itself
                (transformers tests whether a 2D mask can be skipped, which vmap cannot batch).

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
        if not vmappable:
            self.check_token_ids(input_ids)
        embeds = self.transformer.embeddings.word_embeddings(input_ids)
        mask = attention_mask.to(torch.long)
        if self.ctx is not None:
            ctx = self.ctx.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            embeds = torch.cat([embeds[:, :1], ctx, embeds[:, 1:]], dim=1)
            mask = torch.cat([mask[:, :1], mask.new_ones(batch, self.n_ctx), mask[:, 1:]], dim=1)
        attend = _mask_4d(mask, embeds.dtype, self.transformer.config._attn_implementation) if vmappable else mask
        out = self.transformer(inputs_embeds=embeds, attention_mask=attend)
        return self.proj(self.pooler(out, mask))  # B x L mask: a mean pooler averages the real tokens

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Raise ValueError unless every id lies in ``[0, vocab_size)``."""
        vocab = self.cfg.text.vocab_size
        if input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
            raise ValueError(f"ClipText: token ids must lie in [0, vocab_size={vocab})")


def _mask_4d(mask: torch.Tensor, dtype: torch.dtype, attention: str) -> torch.Tensor:
    """B x L padding mask -> the B x 1 x 1 x L mask transformers passes to its attention: boolean
    (True = attend) for SDPA, else additive (0 or the dtype's minimum)."""
    keep = mask.bool()[:, None, None, :]
    if attention == "sdpa":
        return keep
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)
