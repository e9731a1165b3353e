"""Typed configuration for the model, data and training, parsed in one place.

Every size and switch of the model is a field here. Presets (``tiny``, ``base``) are registered
builder functions returning a :class:`ModelConfig`. Configs are plain dataclasses that round-trip
through dictionaries and YAML; parsing is strict: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the dotted field path (e.g. ``model.sam.lora_rank``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class SamConfig:
    """SAM image encoder, prompt encoder and mask decoder (segment-anything modules)."""

    image_size: int = 1024
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
    # Image-encoder attention: "sdpa" (F.scaled_dot_product_attention with the rel-pos bias as
    # the mask; same parameters and outputs) or "sam" (segment-anything's own forward).
    attention: str = "sdpa"
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

    text_tokens: int = 2
    dense_hidden: int = 16
    use_patch_features: bool = False
    use_boxes: bool = True


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
    nce_tau: float = 0.6
    nce_beta1: float = 0.15
    nce_beta2: float = 0.15


@dataclass
class ModelConfig:
    """The whole prompt-driven SAM."""

    preset: str = "custom"
    # Seed of the random initialisation: frozen random weights must be identical at every site.
    init_seed: int = 0
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    boxes: BoxConfig = field(default_factory=BoxConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# --------------------------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """A folder dataset ``<root>/<centre>/{images,masks}`` and its split.

    ``root`` may also be one centre's own folder ``<folder>/{images,masks}`` (the centre is then the
    folder's name; see :func:`shared_model.data.folder.resolve_centres`).
    """

    root: str = "../shared/data/polyp"
    centres: list[str] = field(default_factory=list)  # empty = every centre folder under root
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    split_file: str | None = None
    on_error: str = "raise"  # "raise" or "skip" (skips are reported, never silent)
    augment: bool = True
    prompt_mode: str = "attributes"  # "attributes" captions or "class" (the class name only)
    class_name: str = "polyp"


@dataclass
class TrainConfig:
    """Single-site training."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    num_workers: int = 0
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA
    eval_batch_size: int = 8
    progress: bool = True
    proximal_mu: float = 0.0
    time_limit_s: float = 0.0  # stop early after this many seconds (0 = no limit)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = args
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) mapping, strictly.

    Args:
        cls: The dataclass type.
        data: Mapping of field name to value; nested dataclasses take nested mappings.
        path: Dotted prefix used in error messages.

    Raises:
        ConfigError: On an unknown key or a value of the wrong type, naming the field.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def merge(cfg: T, overrides: dict[str, Any], path: str = "") -> T:
    """Return a copy of dataclass ``cfg`` with (nested) ``overrides`` applied strictly."""
    return from_dict(type(cfg), _deep_update(to_dict(cfg), overrides, path, type(cfg)), path)


def _deep_update(base: dict, upd: dict, path: str, cls: type) -> dict:
    out = dict(base)
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in upd.items():
        if key not in names:
            where = path or cls.__name__
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys are {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[key] = _deep_update(base[key], value, f"{path}.{key}" if path else key, tp)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain nested dict (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def blame_overrides(err: ConfigError, source: str, overrides: Mapping[str, Any],
                    reparse: Callable[[], Any], flag: str = "--set") -> ConfigError:
    """The error of a config parsed with ``overrides``, naming who gave the bad value.

    If the file alone (``reparse``) fails the same way, the file is to blame and ``err`` is kept.
    Otherwise an override is: the error names ``flag`` and the override key as the user wrote it
    (``--set federation.num_server_rounds=-1: federation.num_server_rounds: must be >= 1``).
    """
    try:
        reparse()
    except ConfigError as file_err:
        if str(file_err) == str(err):
            return err
    message = str(err).removeprefix(f"{source}: ")
    named = [k for k in overrides if message.startswith((f"{k}:", f"{k}[", f"{k}."))]
    items = " ".join(f"{flag} {k}={overrides[k]}" for k in (named or list(overrides)))
    return ConfigError(f"{items}: {message}")


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
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


@dataclass
class SiteExperiment:
    """A single-site run: model, data and training settings (the ``train`` command's YAML)."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig


def site_experiment_from_dict(data: dict[str, Any], source: str = "config") -> SiteExperiment:
    """Parse ``{"model": {...}, "data": {...}, "train": {...}}`` strictly, naming ``source`` in errors."""
    unknown = sorted(set(data) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; valid: ['data', 'model', 'train']")
    try:
        exp = SiteExperiment(
            model=model_config_from_dict(data.get("model")),
            data=from_dict(DataConfig, data.get("data") or {}, "data"),
            train=from_dict(TrainConfig, data.get("train") or {}, "train"),
        )
        check_data(exp.data)
        check_train(exp.train)
        return exp
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


# --------------------------------------------------------------------------------------------
# Federation (Flower run config)
# --------------------------------------------------------------------------------------------

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")
PARTITION_MODES = ("centre", "iid", "dirichlet")


@dataclass
class FederationConfig:
    """Server and client settings of a federated run (run-config keys are the kebab-case names)."""

    num_server_rounds: int = 3
    strategy: str = "fedavg"  # one of STRATEGIES
    # global += server_lr * aggregated delta (fedavg, fedprox, fedmedian, fedtrimmedavg).
    server_lr: float = 1.0
    proximal_mu: float = 0.01  # fedprox
    trimmed_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end
    adam_eta: float = 1e-3  # fedadam: server step size (Flower's eta)
    adam_beta_1: float = 0.9
    adam_beta_2: float = 0.99
    adam_tau: float = 1e-6
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2  # minimum available / train / evaluate nodes
    local_steps: int = 10  # optimiser steps per client per round
    wire_dtype: str = "float32"  # float32 | float16 | bfloat16, both directions
    max_update_norm: float = 0.0  # L2 bound on a client's delta (0 = no bound)
    # False (FedAvg's stateless clients): every round starts a fresh AdamW, on purpose: with partial
    # participation a client's moments would be rounds stale. True: kept per client in context.state.
    keep_optimizer_state: bool = False
    seed: int = 0  # initial state, client seeds per (seed, round, partition), node sampling
    device: str = "cpu"  # clients and server-side evaluation ("auto" = CUDA if present)
    eval_batch_size: int = 8
    global_eval: str = "val"  # "val" / "test" (pooled over partitions), "none", or a folder
    run_dir: str = ""  # checkpoints, metrics and report; required by the server
    resume: bool = False  # continue from run_dir/checkpoint.pt
    keep_round_checkpoints: bool = False  # also keep run_dir/checkpoints/round-NNN.pt
    reply_timeout: float = 3600.0  # seconds to wait for replies each round


@dataclass
class PartitionConfig:
    """How simulated hospitals split a pooled folder (run-config keys ``partition-*``)."""

    mode: str = "centre"  # one of PARTITION_MODES
    hospitals: int = 0  # number of simulated hospitals (0 = deployment: real sites, no partitioning)
    dirichlet_alpha: float = 0.5  # size skew: smaller = more unequal
    min_size: int = 4  # every partition gets at least this many samples
    seed: int = 0


@dataclass
class RunSettings:
    """Everything a ServerApp / ClientApp reads from ``context.run_config``, typed."""

    federation: FederationConfig
    partition: PartitionConfig
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    privacy: "PrivacyConfig" = field(default_factory=lambda: PrivacyConfig())


_RUN_JSON_KEYS = ("model-config", "train-config", "data-config")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def to_run_config(
    federation: FederationConfig,
    partition: PartitionConfig,
    model: dict[str, Any],
    train: TrainConfig,
    data: DataConfig,
    privacy: "PrivacyConfig | None" = None,
) -> dict[str, bool | int | float | str]:
    """Map typed settings onto Flower's flat run config (kebab-case keys, scalar values).

    Federation fields keep their names (``num-server-rounds``, ``wire-dtype``); partition fields
    get a ``partition-`` prefix, privacy fields (if given) a ``privacy-`` prefix; the model (``{"preset": ..., <overrides>}``), train and data
    configs travel as JSON strings under ``model-config``, ``train-config`` and ``data-config``.
    """
    import json

    out: dict[str, bool | int | float | str] = {}
    for f in dataclasses.fields(federation):
        out[_kebab(f.name)] = getattr(federation, f.name)
    for f in dataclasses.fields(partition):
        out["partition-" + _kebab(f.name)] = getattr(partition, f.name)
    for f in dataclasses.fields(privacy) if privacy is not None else ():
        out["privacy-" + _kebab(f.name)] = getattr(privacy, f.name)
    out["model-config"] = json.dumps(model, sort_keys=True)
    out["train-config"] = json.dumps(to_dict(train), sort_keys=True)
    out["data-config"] = json.dumps(to_dict(data), sort_keys=True)
    return out


def _scalar_section(cls: type[T], run_config: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + _kebab(f.name)
        if key in run_config:
            kwargs[f.name] = _coerce(run_config[key], hints[f.name], key)
    return cls(**kwargs)


def from_run_config(run_config: dict[str, Any]) -> RunSettings:
    """Parse Flower's ``context.run_config`` strictly into :class:`RunSettings`.

    Missing keys take the dataclass defaults.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type, invalid JSON, or an invalid
            choice; the message names the run-config key (and the nested field).
    """
    import json

    fed_keys = {_kebab(f.name) for f in dataclasses.fields(FederationConfig)}
    part_keys = {"partition-" + _kebab(f.name) for f in dataclasses.fields(PartitionConfig)}
    part_keys |= {"privacy-" + _kebab(f.name) for f in dataclasses.fields(PrivacyConfig)}
    unknown = sorted(set(run_config) - fed_keys - part_keys - set(_RUN_JSON_KEYS))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}")
    federation = _scalar_section(FederationConfig, run_config, "")
    partition = _scalar_section(PartitionConfig, run_config, "partition-")
    parsed: dict[str, dict] = {}
    for key in _RUN_JSON_KEYS:
        text = run_config.get(key, "{}")
        if not isinstance(text, str):
            raise ConfigError(f"{key}: expected a JSON string, got {type(text).__name__}")
        try:
            parsed[key] = json.loads(text or "{}")
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: invalid JSON: {err}") from None
        if not isinstance(parsed[key], dict):
            raise ConfigError(f"{key}: expected a JSON object, got {type(parsed[key]).__name__}")
    settings = RunSettings(
        federation=federation,
        partition=partition,
        model=model_config_from_dict(parsed["model-config"], "model-config"),
        train=from_dict(TrainConfig, parsed["train-config"], "train-config"),
        data=from_dict(DataConfig, parsed["data-config"], "data-config"),
        privacy=_scalar_section(PrivacyConfig, run_config, "privacy-"),
    )
    check_federation(settings.federation, settings.partition)
    check_train(settings.train, "train-config.")
    check_data(settings.data, "data-config.")
    check_privacy(settings.privacy, "privacy-")
    return settings


def _raise_first(checks: list[tuple[str, bool, str]], prefix: str) -> None:
    """Raise ConfigError ``"<prefix><field>: <why>"`` for the first failed ``(field, ok, why)``."""
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{prefix}{_field(name, prefix)}: {why}")


def check_federation(fed: FederationConfig, part: PartitionConfig, run_config: bool = True) -> None:
    """Check choices and ranges, raising ConfigError naming the field as its source spells it.

    Args:
        fed: Federation settings.
        part: Partition settings.
        run_config: Name fields as Flower's run-config keys (``num-server-rounds``,
            ``partition-min-size``); False: as an experiment YAML's dotted snake_case fields
            (``federation.num_server_rounds``, ``partition.min_size``).
    """
    from .exchange import WIRE_DTYPES

    fed_prefix, part_prefix = ("", "partition-") if run_config else ("federation.", "partition.")

    def name(field_name: str, prefix: str) -> str:
        return prefix + (_kebab(field_name) if run_config else field_name)

    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"{name('strategy', fed_prefix)}: {fed.strategy!r} not in {list(STRATEGIES)}")
    if fed.wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"{name('wire_dtype', fed_prefix)}: {fed.wire_dtype!r} not in {sorted(WIRE_DTYPES)}")
    if part.mode not in PARTITION_MODES:
        raise ConfigError(f"{name('mode', part_prefix)}: {part.mode!r} not in {list(PARTITION_MODES)}")
    checks = [
        ("num_server_rounds", fed.num_server_rounds >= 1, "must be >= 1"),
        ("local_steps", fed.local_steps >= 1, "must be >= 1"),
        ("min_nodes", fed.min_nodes >= 1, "must be >= 1"),
        ("fraction_train", 0.0 < fed.fraction_train <= 1.0, "must be in (0, 1]"),
        ("fraction_evaluate", 0.0 <= fed.fraction_evaluate <= 1.0, "must be in [0, 1]"),
        ("trimmed_beta", 0.0 <= fed.trimmed_beta < 0.5, "must be in [0, 0.5)"),
        ("max_update_norm", fed.max_update_norm >= 0.0, "must be >= 0 (0 = no bound)"),
        ("server_lr", fed.server_lr > 0.0, "must be > 0"),
        ("proximal_mu", fed.proximal_mu >= 0.0, "must be >= 0"),
        ("eval_batch_size", fed.eval_batch_size >= 1, "must be >= 1"),
        ("reply_timeout", fed.reply_timeout > 0.0, "must be > 0 (seconds)"),
    ]
    for field_name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{name(field_name, fed_prefix)}: {why}")
    checks = [
        ("dirichlet_alpha", part.dirichlet_alpha > 0.0, "must be > 0"),
        ("min_size", part.min_size >= 1, "must be >= 1"),
        ("hospitals", part.hospitals >= 0, "must be >= 0"),
    ]
    for field_name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{name(field_name, part_prefix)}: {why}")


def check_train(cfg: TrainConfig, prefix: str = "train.") -> None:
    """Check the ranges of a :class:`TrainConfig`, raising ConfigError naming the field.

    Args:
        cfg: Training settings.
        prefix: Prepended to the field name in errors (``train.`` in YAML, ``train-config.``
            for the run config's JSON).
    """
    _raise_first([
        ("steps", cfg.steps >= 1, "must be >= 1 (optimiser steps)"),
        ("batch_size", cfg.batch_size >= 1, "must be >= 1"),
        ("eval_batch_size", cfg.eval_batch_size >= 1, "must be >= 1"),
        ("lr", cfg.lr > 0.0, "must be > 0"),
        ("weight_decay", cfg.weight_decay >= 0.0, "must be >= 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "must be >= 0"),
        ("grad_clip", cfg.grad_clip >= 0.0, "must be >= 0 (0 = no clipping)"),
        ("num_workers", cfg.num_workers >= 0, "must be >= 0 (0 = load in the main process)"),
        ("proximal_mu", cfg.proximal_mu >= 0.0, "must be >= 0"),
        ("time_limit_s", cfg.time_limit_s >= 0.0, "must be >= 0 (0 = no limit)"),
    ], prefix)


def check_data(cfg: DataConfig, prefix: str = "data.") -> None:
    """Check the choices and split fractions of a :class:`DataConfig`, naming the field."""
    choices = [("on_error", ("raise", "skip")), ("prompt_mode", ("attributes", "class"))]
    for name, valid in choices:
        if getattr(cfg, name) not in valid:
            raise ConfigError(f"{prefix}{name}: {getattr(cfg, name)!r} not in {list(valid)}")
    _raise_first([
        ("val_fraction", 0.0 <= cfg.val_fraction < 1.0, "must be in [0, 1)"),
        ("test_fraction", 0.0 <= cfg.test_fraction < 1.0, "must be in [0, 1)"),
        ("test_fraction", cfg.val_fraction + cfg.test_fraction < 1.0,
         f"val_fraction + test_fraction must be < 1, got {cfg.val_fraction} + {cfg.test_fraction}"),
        ("root", bool(cfg.root), "must name a folder"),
    ], prefix)


# --------------------------------------------------------------------------------------------
# Privacy
# --------------------------------------------------------------------------------------------

DP_ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("microbatch", "batched")
CENTRAL_DP_MODES = ("off", "fixed", "adaptive")


@dataclass
class PrivacyConfig:
    """Local differential privacy at one hospital: DP-SGD (Opacus) on the exchanged parameters.

    The budget ``(epsilon, delta)`` covers every round the hospital takes part in; accounting is
    cumulative (see :mod:`shared_model.privacy`).
    """

    local_dp: bool = False
    epsilon: float = 8.0  # the hospital's total budget over all its rounds
    delta: float = 1e-5  # must be < 1 / (number of local training images)
    max_grad_norm: float = 1.0  # per-example L2 clipping bound C
    # Gaussian noise std / C; 0 = calibrate so that planned_steps steps spend exactly epsilon.
    noise_multiplier: float = 0.0
    # DP-SGD steps the budget must last (0 = the steps of the call; federated: rounds x local steps).
    planned_steps: int = 0
    accountant: str = "rdp"  # one of DP_ACCOUNTANTS
    # How per-example gradients are computed (one of GRAD_SAMPLE_MODES): "microbatch" runs each
    # example alone; "batched" runs one forward pass and one backward pass per example.
    grad_sample_mode: str = "microbatch"
    # Seed of the noise and of Poisson sampling; -1 = OS entropy. A fixed seed lets anyone who
    # knows it remove the noise: for tests only.
    noise_seed: int = -1
    # Under local DP, train replies carry NaN for train-loss / val-dice / train-seconds (statistics
    # of the private data outside the DP guarantee; the time follows the sampled batch sizes) unless
    # this is true.
    release_metrics: bool = False

    # Central DP on the server: Flower's DP wrappers around FedAvg / FedProx; hospital-level.
    central_dp: str = "off"  # one of CENTRAL_DP_MODES
    central_noise_multiplier: float = 1.0  # noise std / clipping norm, on the sum of the deltas
    central_clipping_norm: float = 0.1  # L2 bound on each hospital's delta (adaptive: initial bound)
    central_clients: int = 0  # hospitals per round (0 = partition hospitals, else min-nodes)
    central_delta: float = 1e-5
    central_epsilon: float = 0.0  # stop before the server-side epsilon exceeds this (0 = report only)
    adaptive_target_quantile: float = 0.5  # fraction of hospitals whose delta should go unclipped
    adaptive_clip_lr: float = 0.2
    adaptive_count_stddev: float = 0.0  # noise on the clipped count (0 = Flower's hospitals / 20)

    # Secure aggregation (Flower SecAgg+): the server only sees the sum of the hospitals' deltas.
    secagg: bool = False
    secagg_shares: float = 1.0  # key shares per hospital, as a fraction of the round's hospitals
    secagg_threshold: float = 0.67  # fraction of the shares needed to reconstruct a key (>= 2 shares)
    secagg_clipping_range: float = 1.0  # every delta value is clipped to +-this before quantisation
    secagg_quantization_range: int = 4194304  # 2**22 integer levels
    # Weights (num-examples) are divided by this before quantisation: set it to the largest
    # hospital's num-examples. Larger loses precision (the step of one averaged value is
    # 2 clipping_range / quantization_range x max_weight / sum of num-examples); smaller overflows.
    secagg_max_weight: float = 1000.0


def _field(name: str, prefix: str) -> str:
    """Field name as the source spells it: kebab-case in the run config (``privacy-``), else snake."""
    return _kebab(name) if prefix.endswith("-") else name


def check_privacy(cfg: PrivacyConfig, prefix: str = "privacy.") -> None:
    """Check ranges and choices of a :class:`PrivacyConfig`, raising ConfigError naming the field
    (``privacy.max_grad_norm`` in YAML, ``privacy-max-grad-norm`` in the run config)."""
    choices = [("accountant", DP_ACCOUNTANTS), ("grad_sample_mode", GRAD_SAMPLE_MODES),
               ("central_dp", CENTRAL_DP_MODES)]
    for name, valid in choices:
        if getattr(cfg, name) not in valid:
            raise ConfigError(f"{prefix}{_field(name, prefix)}: {getattr(cfg, name)!r} not in {list(valid)}")
    checks = [
        ("epsilon", cfg.epsilon > 0.0, "must be > 0"),
        ("delta", 0.0 < cfg.delta < 1.0, "must be in (0, 1)"),
        ("max_grad_norm", cfg.max_grad_norm > 0.0, "must be > 0"),
        ("noise_multiplier", cfg.noise_multiplier >= 0.0, "must be >= 0 (0 = calibrate from epsilon)"),
        ("planned_steps", cfg.planned_steps >= 0, "must be >= 0"),
        ("central_noise_multiplier", cfg.central_noise_multiplier > 0.0, "must be > 0"),
        ("central_clipping_norm", cfg.central_clipping_norm > 0.0, "must be > 0"),
        ("central_clients", cfg.central_clients >= 0, "must be >= 0 (0 = the number of hospitals)"),
        ("central_delta", 0.0 < cfg.central_delta < 1.0, "must be in (0, 1)"),
        ("central_epsilon", cfg.central_epsilon >= 0.0, "must be >= 0 (0 = report only)"),
        ("adaptive_target_quantile", 0.0 <= cfg.adaptive_target_quantile <= 1.0, "must be in [0, 1]"),
        ("adaptive_clip_lr", cfg.adaptive_clip_lr >= 0.0, "must be >= 0"),
        ("adaptive_count_stddev", cfg.adaptive_count_stddev >= 0.0, "must be >= 0 (0 = hospitals / 20)"),
        ("secagg_shares", 0.0 < cfg.secagg_shares <= 1.0, "must be a fraction in (0, 1]"),
        ("secagg_threshold", 0.0 < cfg.secagg_threshold <= 1.0, "must be a fraction in (0, 1]"),
        ("secagg_clipping_range", cfg.secagg_clipping_range > 0.0, "must be > 0"),
        ("secagg_quantization_range", 2 <= cfg.secagg_quantization_range < 2**32, "must be in [2, 2**32)"),
        ("secagg_max_weight", cfg.secagg_max_weight > 0.0, "must be > 0"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{prefix}{_field(name, prefix)}: {why}")
    if cfg.secagg and cfg.central_dp != "off":
        raise ConfigError(
            f"{prefix}secagg: central DP clips each hospital's delta on the server, which SecAgg+ hides; "
            "use local DP with secure aggregation, or central DP without it"
        )
