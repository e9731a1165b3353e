"""The model's configuration: one dataclass per block of the pipeline, and the presets registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from shared_model.config.parse import ConfigError, merge

# sam.attention values that select an implementation of this project's encoder attention
# (shared_model.modeling.sam_attention); "sam" keeps segment-anything's own forward.
ATTENTION_IMPLS = ("auto", "eager", "sdpa")


@dataclass
class SamConfig:
    """SAM image encoder, prompt encoder and mask decoder (segment-anything modules)."""

    image_size: int = 1024
    # How an H x W image becomes the S x S input: "letterbox" (aspect ratio kept, zero padding at
    # the bottom/right, as segment-anything's ResizeLongestSide + pad) or "squash" (stretched).
    input_resize: str = "letterbox"
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    multimask: bool = False  # train/predict with SAM's multimask outputs (else the single-mask token)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # Image-encoder attention (same parameters and outputs): "auto" (sdpa on CUDA, eager elsewhere),
    # "eager" (scores + rel-pos bias in place, fastest on CPU), "sdpa" (F.scaled_dot_product_attention
    # with the rel-pos bias as the mask) or "sam" (segment-anything's own forward).
    attention: str = "auto"
    # Recompute each image-encoder block in backward instead of storing its activations
    # (less GPU memory for ~one more encoder forward per step).
    activation_checkpointing: bool = False
    # Adapters: LoRA on the frozen image encoder.
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])
    # Which encoder blocks get LoRA (empty = all).
    lora_blocks: list[int] = field(default_factory=list)
    # "lora": LoRA on the decoder's attention projections; "train": whole decoder trainable;
    # "frozen": decoder fixed.
    decoder_mode: str = "lora"
    decoder_lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    prompt_encoder_trainable: bool = True
    # Path to an official SAM ``.pth`` (e.g. sam_vit_b_01ec64.pth); None = random init.
    checkpoint: str | None = None


@dataclass
class ClipVisionConfig:
    """BiomedCLIP vision tower (timm ViT inside open_clip's TimmModel)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # LoRA on the qkv of the last ``lora_last_blocks`` blocks (0 = none).
    lora_last_blocks: int = 2
    # Fully unfreeze the last ``unfreeze_last_blocks`` blocks (0 = none; costs many parameters).
    unfreeze_last_blocks: int = 0


@dataclass
class ClipTextConfig:
    """BiomedCLIP text tower (BERT via transformers inside open_clip's HFTextEncoder)."""

    vocab_size: int = 30522
    width: int = 768
    depth: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    context_length: int = 256
    # CoOp context vectors inserted after [CLS].
    n_ctx: int = 16
    ctx_init_std: float = 0.02
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_last_layers: int = 0
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    # How the tower turns its tokens into one vector: an open_clip pooler name. BiomedCLIP's is
    # "cls_last_hidden_state_pooler" (the [CLS] token's last hidden state); "mean_pooler" averages
    # the real tokens. A checkpoint folder records its own, which this must match.
    pooler: str = "cls_last_hidden_state_pooler"


@dataclass
class ClipConfig:
    """BiomedCLIP: both towers and the shared embedding size."""

    embed_dim: int = 512
    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    # Local open_clip folder (open_clip_config.json, open_clip_pytorch_model.bin, tokenizer files);
    # None = random init with the built-in tokenizer.
    checkpoint: str | None = None


@dataclass
class BottleneckConfig:
    """M2IB information bottleneck with a text-conditioned gate network."""

    layer: int = 8  # bottleneck inserted after this vision block (1-based)
    gate_hidden: int = 32
    beta: float = 0.1
    noise: bool = True  # sample eps ~ N(0, 1) while training


@dataclass
class CRFConfig:
    """Differentiable mean-field CRF with local-window Gaussian + bilateral kernels."""

    enabled: bool = True
    iterations: int = 5
    kernel_size: int = 7
    resolution: int = 64  # the CRF runs on a resolution x resolution grid
    gaussian_sigma: float = 3.0  # pixels at ``resolution``
    gaussian_weight: float = 3.0
    bilateral_sigma_xy: float = 5.0
    bilateral_sigma_rgb: float = 0.1  # intensity units of images in [0, 1]
    bilateral_weight: float = 5.0
    learnable_weights: bool = False


@dataclass
class BoxConfig:
    """Saliency -> box prompts."""

    threshold: float = 0.5
    mode: str = "enclosing"  # "enclosing" (one box) or "components" (one per component, top-k)
    top_k: int = 3
    min_area: float = 0.002  # components smaller than this fraction of the image are ignored
    grid: int = 64  # boxes are found on a grid x grid resampling of the saliency


@dataclass
class PromptConfig:
    """Projections from CLIP into SAM's sparse and dense prompt spaces."""

    text_tokens: int = 2  # text -> this many sparse prompt tokens (0: no text prompt for SAM)
    dense_saliency: bool = True  # saliency -> SAM's dense prompt (False: SAM's no-mask embedding only)
    dense_hidden: int = 16
    use_patch_features: bool = False
    use_boxes: bool = True
    # Where box prompts come from: "saliency" (boxes of the refined saliency map), "mask" (a two-pass
    # cascade: SAM first segments without a box, then again with the box enclosing its own first
    # mask; the image is encoded once, the decoder runs twice, and the first mask is trained too) or
    # "ground-truth" (an oracle for experiments: training and evaluation pass each mask's enclosing
    # box, the upper bound of a clinician's box; at prediction time the user's --boxes).
    box_source: str = "saliency"


@dataclass
class LossConfig:
    """Weights and hyper-parameters of the training losses."""

    dice: float = 1.0
    # Mean-over-pixels BCE is ruled by the background when polyps are small: at weight 1 the first
    # steps drive every pixel to background and Dice to 0 (the round-1 collapse). 0.2 as in SAMed.
    bce: float = 0.2
    nce: float = 0.1
    ib: float = 0.1
    saliency: float = 0.5
    iou: float = 1.0  # MSE between SAM's IoU prediction and the IoU of its own mask
    coarse: float = 1.0  # Dice (+ bce-weighted BCE) of the first-pass mask (prompts.box_source: mask)
    nce_tau: float = 0.6
    nce_beta1: float = 0.15
    nce_beta2: float = 0.15


@dataclass
class ModelConfig:
    """The whole prompt-driven SAM."""

    preset: str = "custom"
    # Seed of the random initialisation: frozen random weights must be identical at every site.
    init_seed: int = 0
    # Start from a foundation (shared_model.modeling.foundation): a packaged name ("tiny") or a folder
    # written by `promptsam pretrain`; it sets the SAM and CLIP weights (None = the checkpoints below).
    foundation: str | None = None
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    boxes: BoxConfig = field(default_factory=BoxConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# Presets
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    """Decorator adding a ModelConfig builder to :data:`PRESETS`."""

    def deco(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        PRESETS[name] = fn
        return fn

    return deco


@register_preset("base")
def base_config() -> ModelConfig:
    """SAM ViT-B (1024 px) + BiomedCLIP ViT-B/16 + BERT-base: the real architecture."""
    return ModelConfig(preset="base")


@register_preset("tiny")
def tiny_config() -> ModelConfig:
    """A small random-init model for tests, the demo and CPU training (128 px)."""
    return ModelConfig(
        preset="tiny",
        sam=SamConfig(
            image_size=128,
            patch_size=8,
            width=128,
            depth=4,
            heads=4,
            window_size=8,
            global_attn_indexes=[1, 3],
            prompt_dim=64,
            mask_in_chans=8,
            decoder_depth=2,
            decoder_mlp_dim=256,
            decoder_heads=4,
            iou_head_hidden_dim=64,
            decoder_mode="train",
        ),
        clip=ClipConfig(
            embed_dim=64,
            vision=ClipVisionConfig(
                image_size=64, patch_size=8, width=64, depth=4, heads=4, lora_last_blocks=2
            ),
            text=ClipTextConfig(
                vocab_size=512,
                width=64,
                depth=2,
                heads=4,
                intermediate_size=128,
                max_position_embeddings=64,
                context_length=48,
                n_ctx=4,
                lora_last_layers=1,
            ),
        ),
        bottleneck=BottleneckConfig(layer=2, gate_hidden=16),
        crf=CRFConfig(iterations=3, kernel_size=5, resolution=32, gaussian_sigma=1.5,
                      bilateral_sigma_xy=2.5),
        boxes=BoxConfig(grid=32),
        prompts=PromptConfig(text_tokens=2, dense_hidden=8),
    )


def get_preset(name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Return the named preset's ModelConfig, with optional nested overrides.

    Raises:
        ConfigError: If the preset is unknown or an override is invalid.
    """
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; available: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return merge(cfg, overrides, "model") if overrides else cfg


def model_config_from_dict(data: dict[str, Any] | None, path: str = "model") -> ModelConfig:
    """``{"preset": "tiny", "sam": {...}, ...}`` -> the preset's ModelConfig with the rest as overrides."""
    data = dict(data or {})
    preset = data.pop("preset", "tiny")
    if not isinstance(preset, str):
        raise ConfigError(f"{path}.preset: expected a string, got {preset!r}")
    cfg = get_preset(preset)
    return merge(cfg, data, path) if data else cfg
