"""Local differential privacy at one hospital: DP-SGD on the exchanged parameters (no Flower imports).

Each step draws a Poisson sample of the local training set (every image independently with
probability ``q = batch_size / N``, Opacus' ``UniformWithReplacementSampler``), computes one
gradient per image for every trainable (= exchanged) parameter, and hands them to Opacus'
``DPOptimizer``, which clips each image's gradient to L2 norm ``C`` (``max_grad_norm``), sums them,
adds ``N(0, (sigma C)^2)`` noise and divides by the expected batch size before the AdamW step.
Frozen weights get no gradient and never change, so only the exchanged state carries the noise.

Per-example gradients are computed with autograd, not with Opacus' module hooks: the model runs
the CLIP tail on clean and bottlenecked tokens as one 2B batch, reads SAM's prompt and output
tokens through ``.weight`` instead of calling the embedding modules, and the CoOp context sits on
a module with buffers, which Opacus' ``GradSampleModule`` refuses ("This layer has buffers and is
not supported by Opacus"). Two modes (``PrivacyConfig.grad_sample_mode``):

* ``microbatch``: each image runs alone (forward + backward at batch 1): exact by construction.
* ``batched``: one forward pass over the batch, per-image losses, one backward pass per image;
  exact only because nothing in the forward pass mixes images (tested against ``microbatch``).
* ``vmap``: ``torch.func.vmap(grad(loss))`` over the images, a function of the trainable
  parameters only (frozen weights and buffers closed over through ``functional_call``): one
  vectorised forward and backward for the whole batch. The data-dependent box search runs first
  without gradient (:meth:`PromptSAM.derive_boxes`) and prompts go in as token ids; random ops
  (bottleneck noise, dropout) draw independently per image (``randomness="different"``). Equal to
  ``microbatch`` up to float rounding (tested).
* ``auto``: ``vmap``, or ``microbatch`` with a log line saying why where vmap fails for a model
  (remembered per model).

DHN-NCE compares each image with the others of the batch, so one image's gradient would depend
on other patients' data and clipping would no longer bound its influence; under DP the code
refuses ``loss.nce != 0``. Every other loss term and the whole forward pass are per image.

Accounting is cumulative (:mod:`shared_model.training.accounting`, re-exported here): an Opacus RDP
(or PRV) accountant whose history, a list of ``(noise_multiplier, sample_rate, steps)`` entries,
is kept between calls as plain lists, so a Flower client can keep it in ``context.state``.
"""

from __future__ import annotations

import logging
import secrets
import statistics
import weakref
from dataclasses import fields
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset, default_collate

from shared_model.config import GRAD_SAMPLE_MODES, ConfigError, PrivacyConfig, TrainConfig, check_privacy
from shared_model.training.accounting import (  # noqa: F401 - re-exported: the accounting API lives here too
    AccountantState,
    PrivacyBudgetExceeded,
    PrivacyError,
    accountant_from_state,
    accountant_to_state,
    calibrate_noise,
    epsilon_after,
    new_accountant_state,
    sample_rate_for,
    spent_epsilon,
)
from shared_model.modeling.prompt_sam import PromptSAM, PromptSAMOutput, TextTokens
from shared_model.training.loop import GradientStep, LRSchedule, TrainResult, autocast_for, resolve_device, train_model
from shared_model.training.opacus_compat import DPOptimizer, UniformWithReplacementSampler


# --------------------------------------------------------------------------------------------
# Per-example gradients
# --------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)
# Models on which vmap failed, with the reason: ``auto`` uses microbatch for them from then on.
_VMAP_REFUSED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def check_model_for_dp(model: PromptSAM) -> None:
    """Refuse what breaks per-example privacy: DHN-NCE (couples the batch) and BatchNorm layers.

    Raises:
        PrivacyError: Naming the setting or module.
    """
    if model.cfg.loss.nce != 0.0:
        raise PrivacyError(
            f"model.loss.nce: must be 0 under DP-SGD (got {model.cfg.loss.nce}); DHN-NCE uses the other "
            "images of the batch as negatives, so one image's gradient would depend on other patients' "
            "data and per-example clipping would not bound its influence"
        )
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise PrivacyError(f"BatchNorm mixes the images of a batch and is not allowed under DP: {norms[:5]}")


def _slice_output(out: PromptSAMOutput, i: int) -> PromptSAMOutput:
    values = {f.name: getattr(out, f.name) for f in fields(out)}
    return PromptSAMOutput(**{k: None if v is None else v[i : i + 1] for k, v in values.items()})


def per_example_gradients(
    model: PromptSAM,
    images: torch.Tensor,
    masks: torch.Tensor,
    texts: list[str],
    mode: str = "microbatch",
    amp: bool = False,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Gradient of each image's own loss for every trainable parameter.

    Args:
        model: The model (its device is used; train/eval mode is left as is).
        images: B x 3 x S x S in [0, 1].
        masks: B x 1 x S x S in {0, 1}.
        texts: B prompts.
        mode: ``"microbatch"``, ``"batched"``, ``"vmap"`` or ``"auto"`` (see the module docstring).
        amp: bf16 autocast on CUDA.

    Returns:
        (name -> B x *param.shape float32 gradients, one loss-parts dict per image).
    """
    if mode == "auto":
        if model not in _VMAP_REFUSED and images.shape[0] > 0:
            try:
                return vmap_gradients(model, images, masks, texts, amp)
            except Exception as err:  # noqa: BLE001 - any op vmap cannot batch: fall back, saying why
                _VMAP_REFUSED[model] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                log.warning("per-example gradients: torch.func.vmap failed on this model (%s); using the "
                            "microbatch mode instead", _VMAP_REFUSED[model])
        mode = "microbatch"
    if mode == "vmap":
        if images.shape[0] > 0:
            return vmap_gradients(model, images, masks, texts, amp)
        mode = "microbatch"  # nothing to map over
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    b = images.shape[0]
    losses: list[torch.Tensor] = []
    logs: list[dict[str, float]] = []
    grads: list[tuple[torch.Tensor, ...]] = []
    if mode == "microbatch":
        for i in range(b):
            with autocast_for(device, amp):
                out = model(images[i : i + 1], texts[i : i + 1], **model.oracle_prompts(masks[i : i + 1]))
            loss, parts = model.compute_losses(out, masks[i : i + 1])
            grads.append(torch.autograd.grad(loss, params, materialize_grads=True))
            logs.append(parts)
    elif mode == "batched":
        with autocast_for(device, amp):
            out = model(images, texts, **model.oracle_prompts(masks))
        for i in range(b):
            loss, parts = model.compute_losses(_slice_output(out, i), masks[i : i + 1])
            losses.append(loss)
            logs.append(parts)
        for i in range(b):
            grads.append(torch.autograd.grad(losses[i], params, retain_graph=i < b - 1, materialize_grads=True))
    else:
        raise ConfigError(f"privacy.grad_sample_mode: {mode!r} not in {list(GRAD_SAMPLE_MODES)}")
    if b == 0:
        return {n: p.new_zeros((0, *p.shape), dtype=torch.float32) for n, p in zip(names, params)}, logs
    return {n: torch.stack([g[j] for g in grads]).float() for j, n in enumerate(names)}, logs


def vmap_gradients(
    model: PromptSAM, images: torch.Tensor, masks: torch.Tensor, texts: list[str], amp: bool = False
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """:func:`per_example_gradients` in one vectorised pass (``torch.func``; the ``vmap`` mode).

    Each image's loss is a function of the trainable parameters alone; ``vmap(grad(...))`` maps
    it over (image, mask, token ids, derived boxes). Raises whatever vmap raises on an op it
    cannot batch.
    """
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    device = images.device
    b = images.shape[0]
    tokens = model.tokenize(texts)
    ids, attention = tokens.ids.to(device), tokens.mask.to(device)
    oracle = model.oracle_prompts(masks)
    if oracle:  # ground-truth boxes (an experiment's oracle)
        boxes, valid = oracle["boxes"], oracle["box_valid"]
    elif model.uses_saliency_boxes or model.uses_mask_boxes:
        boxes, valid = model.derive_boxes(images, tokens)
    else:  # no box prompts: forward ignores empty prompt_boxes
        boxes, valid = images.new_zeros(b, 0, 4), torch.zeros(b, 0, dtype=torch.bool, device=device)

    def loss_of(params, image, mask, ids_i, attention_i, boxes_i, valid_i):
        with autocast_for(device, amp):
            text = TextTokens(ids_i[None], attention_i[None])
            out = functional_call(model, (params, frozen, buffers), (image[None], text),
                                  {"prompt_boxes": (boxes_i[None], valid_i[None])})
        return model.compute_loss_terms(out, mask[None])

    grads, terms = vmap(grad(loss_of, has_aux=True), in_dims=(None, 0, 0, 0, 0, 0, 0), randomness="different")(
        trainable, images, masks, ids, attention, boxes, valid)
    logs = [{k: float(v[i]) for k, v in terms.items()} for i in range(b)]
    return {n: g.float() for n, g in grads.items()}, logs


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed >= 0 else secrets.randbits(63))


def train_model_dp(
    model: PromptSAM,
    dataset: Dataset,
    cfg: TrainConfig,
    dp: PrivacyConfig,
    accountant_state: Mapping[str, Any] | None = None,
    device: str | torch.device | None = "cpu",
    steps: int | None = None,
    proximal_reference: Mapping[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    schedule: LRSchedule | None = None,
) -> tuple[TrainResult, AccountantState, float]:
    """DP-SGD (Poisson sampling, per-example clipping, Gaussian noise) with AdamW, cumulative accounting.

    Args:
        model: The model; only parameters with ``requires_grad`` (the exchanged state) train.
        dataset: Items ``{"image": 3 x S x S, "mask": 1 x S x S, "text": str}``.
        cfg: Training settings; ``batch_size`` is the expected Poisson batch, ``grad_clip`` is
            replaced by ``dp.max_grad_norm`` per example; ``time_limit_s`` may end the call early.
        dp: Privacy settings (budget, delta, clipping bound, noise, accountant, mode, seed).
        accountant_state: History of earlier calls (:func:`accountant_to_state`); None = none.
        device: Device (``"auto"`` picks CUDA when present).
        steps: DP-SGD steps of this call (default ``cfg.steps``).
        proximal_reference: Global exchanged state for FedProx's term (used if
            ``cfg.proximal_mu > 0``); its gradient needs no data and is added after the noise.
        optimizer_state: AdamW state from a previous call to continue from.
        on_step: Optional callback ``(step, log)`` after each step.
        schedule: Position of this call in the run's learning-rate schedule (see
            :class:`shared_model.training.loop.LRSchedule`).

    Returns:
        (TrainResult, the new accountant state, cumulative epsilon at ``dp.delta``).
        ``num_examples`` is the expected count ``steps x batch_size``: the actual Poisson batch
        sizes depend on the data and are not released.

    Raises:
        PrivacyBudgetExceeded: If the call's steps would take epsilon past ``dp.epsilon``;
            nothing is trained then.
        PrivacyError: If the model uses DHN-NCE, the batch size or the data do not fit, or the
            accountant state is invalid.
    """
    check_privacy(dp)
    check_model_for_dp(model)
    device = resolve_device(device)
    steps = cfg.steps if steps is None else steps
    n = len(dataset)
    q = sample_rate_for(cfg.batch_size, n)
    if dp.delta >= 1.0 / n:
        raise PrivacyError(f"privacy.delta: {dp.delta} must be below 1 / (number of images = {n})")
    sigma = calibrate_noise(dp, q, dp.planned_steps or steps)
    accountant = accountant_from_state(accountant_state, dp.accountant)
    spent = spent_epsilon(accountant_state, dp.delta, dp.accountant)
    planned = epsilon_after(accountant_state, dp.delta, sigma, q, steps, dp.accountant)
    if planned > dp.epsilon:
        raise PrivacyBudgetExceeded(
            f"privacy budget: {steps} more DP-SGD steps (noise {sigma:.3f}, sampling rate {q:.4f}) would "
            f"raise epsilon from {spent:.3f} to {planned:.3f}, past the budget {dp.epsilon} at delta "
            f"{dp.delta}; this hospital trains no further"
        )

    step = DPGradientStep(dp, sigma, q, accountant)
    result = train_model(model, dataset, cfg, device=device, steps=steps, proximal_reference=proximal_reference,
                         optimizer_state=optimizer_state, on_step=on_step, schedule=schedule, gradient_step=step)
    state = accountant_to_state(accountant)
    return result, state, spent_epsilon(state, dp.delta, dp.accountant)


class DPGradientStep(GradientStep):
    """DP-SGD's gradient: a Poisson sample, per-example gradients, Opacus' clip + noise.

    Args:
        dp: Privacy settings (clipping bound, grad-sample mode, noise seed).
        sigma: Noise multiplier.
        sample_rate: Poisson sampling rate ``q``.
        accountant: Opacus accountant; one step at ``(sigma, q)`` is recorded per step.
    """

    def __init__(self, dp: PrivacyConfig, sigma: float, sample_rate: float, accountant: Any) -> None:
        self.dp, self.sigma, self.sample_rate, self.accountant = dp, sigma, sample_rate, accountant

    def prepare(self, model: PromptSAM, dataset: Dataset, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                steps: int, device: torch.device) -> Iterator[dict | None]:
        """Wrap the optimizer in Opacus' ``DPOptimizer``; batches are Poisson samples (None if empty)."""
        self.dataset, self.cfg, self.device = dataset, cfg, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dp_optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.sigma, max_grad_norm=self.dp.max_grad_norm,
            expected_batch_size=cfg.batch_size, generator=_generator(self.dp.noise_seed),
        )
        sampler = UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=self.sample_rate, steps=steps,
            generator=_generator(self.dp.noise_seed + 1 if self.dp.noise_seed >= 0 else -1),
        )
        return (self._batch(step, indices) for step, indices in enumerate(sampler))

    def _batch(self, step: int, indices: list[int]) -> dict | None:
        if hasattr(self.dataset, "set_epoch"):  # fresh augmentations every step
            self.dataset.set_epoch(self.cfg.seed + step)
        return default_collate([self.dataset[i] for i in indices]) if indices else None

    def compute(self, model: PromptSAM, batch: dict | None, step: int) -> tuple[dict[str, float], int, bool]:
        """Per-example gradients, then clip each to ``max_grad_norm``, sum, add noise, average."""
        if batch is None:
            grad_samples = {n: p.new_zeros((0, *p.shape)) for n, p in model.named_parameters() if p.requires_grad}
            logs: list[dict[str, float]] = []
        else:
            grad_samples, logs = per_example_gradients(
                model, batch["image"].to(self.device), batch["mask"].to(self.device), list(batch["text"]),
                self.dp.grad_sample_mode, self.cfg.amp,
            )
        for p, g in zip(self.params, grad_samples.values()):
            p.grad_sample = g.to(p.dtype)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grad_samples.values()], 1).norm(dim=1)
        log = {k: statistics.fmean(d[k] for d in logs) for k in logs[0]} if logs else {}
        log.update(batch_size=float(len(norms)),
                   clipped=float((norms > self.dp.max_grad_norm).float().mean()) if len(norms) else 0.0)
        # Counted as the expected batch size: the actual Poisson sizes depend on the data and are not released.
        return log, self.cfg.batch_size, self.dp_optimizer.pre_step()

    def finish(self) -> None:
        """Clear the per-example gradients and record the step with the accountant."""
        self.dp_optimizer.zero_grad(set_to_none=True)
        self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.sample_rate)
