"""Inference on images of any size: image(s) + text prompt -> mask, saliency, boxes; overlays.

Images are resized to the model's input size, segmented in batches, and the outputs are mapped
back to each image's own size. Optional user boxes/points (a clinician's correction) are given in
the ORIGINAL image's pixel coordinates and replace the saliency-derived boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage

from shared_model.data.geometry import Frame
from shared_model.modeling.prompt_sam import PromptSAM
from shared_model.training.loop import autocast_for, resolve_device

MASK_COLOUR = (0, 255, 0)
TRUTH_COLOUR = (255, 255, 0)
BOX_COLOUR = (0, 255, 255)


@dataclass
class Prediction:
    """One image's prediction, at the image's own size (H x W).

    Attributes:
        mask: H x W bool.
        probability: H x W float32 in [0, 1].
        saliency: H x W float32 in [0, 1] (CRF-refined).
        boxes: list of [x0, y0, x1, y1] in image pixels (the prompts used).
        score: predicted mask quality (SAM's IoU head).
        confidence: mean probability inside the predicted mask (0 when empty).
        raw_saliency: H x W float32 in [0, 1], the M2IB saliency before the CRF (the heatmap
            shown in overlays); None when not kept.
    """

    mask: np.ndarray
    probability: np.ndarray
    saliency: np.ndarray
    boxes: list[list[float]]
    score: float
    confidence: float
    raw_saliency: np.ndarray | None = None

    @property
    def heat(self) -> np.ndarray:
        """H x W saliency shown as the heatmap: the raw M2IB map when kept, else the refined one."""
        return self.saliency if self.raw_saliency is None else self.raw_saliency

    def summary(self) -> dict:
        """JSON-able summary: boxes, area (pixels and fraction), score and confidence."""
        area = int(self.mask.sum())
        return {
            "boxes": [[round(v, 1) for v in b] for b in self.boxes],
            "area_pixels": area,
            "area_fraction": area / self.mask.size,
            "components": int(ndimage.label(self.mask)[1]),
            "score": self.score,
            "confidence": self.confidence,
        }


def check_device(device: str | torch.device | None = "auto") -> torch.device:
    """Resolve a device name like :func:`~shared_model.training.loop.resolve_device`, but fail clearly.

    Args:
        device: ``"auto"``/None (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Returns:
        The torch device.

    Raises:
        ValueError: An unknown device name, CUDA requested on a machine without a usable GPU (or
            with a CPU-only torch build), or a CUDA index beyond the visible GPUs.
    """
    try:
        dev = resolve_device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {str(device)!r} (use auto, cpu, cuda or cuda:N): {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available (torch "
                             f"{torch.__version__}, {build}, no usable GPU visible); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
    return dev


def to_tensor(image: np.ndarray | Image.Image, frame: Frame) -> torch.Tensor:
    """H x W x 3 uint8 (or PIL) -> 3 x S x S float in [0, 1], placed per ``frame`` (letterbox or squash)."""
    h, w = frame.content
    arr = np.asarray(Image.fromarray(np.asarray(image)).convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    return F.pad(t, (0, frame.size - w, 0, frame.size - h))


@torch.no_grad()
def predict_images(
    model: PromptSAM,
    images: Sequence[np.ndarray | Image.Image],
    prompt: str | Sequence[str] = "polyp",
    boxes: Sequence[Sequence[Sequence[float]] | None] | None = None,
    points: Sequence[tuple[Sequence[Sequence[float]], Sequence[int]] | None] | None = None,
    threshold: float = 0.5,
    batch_size: int = 4,
    device: str | torch.device | None = "auto",
) -> list[Prediction]:
    """Segment images with a text prompt, optionally corrected by user boxes or points.

    Args:
        model: A built (and trained) PromptSAM.
        images: H_i x W_i x 3 uint8 arrays or PIL images.
        prompt: One prompt for all images or one per image.
        boxes: Per image, None or a list of [x0, y0, x1, y1] in that image's pixels.
        points: Per image, None or (list of [x, y], list of labels 1=fg/0=bg) in its pixels.
        threshold: Probability threshold of the mask.
        batch_size: Images per forward pass (images with user prompts go one at a time).
        device: Device (``"auto"``: CUDA when present; see :func:`check_device`).

    Returns:
        One :class:`Prediction` per image.

    Raises:
        ValueError: An unknown or unavailable device, or a prompt count that does not match.
    """
    device = check_device(device)
    model.to(device).eval()
    n = len(images)
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images")
    boxes = list(boxes) if boxes is not None else [None] * n
    points = list(points) if points is not None else [None] * n
    size, resize = model.image_size, model.cfg.sam.input_resize
    results: list[Prediction] = []
    plain = [i for i in range(n) if boxes[i] is None and points[i] is None]
    order = [plain[i : i + batch_size] for i in range(0, len(plain), batch_size)]
    order += [[i] for i in range(n) if i not in set(plain)]
    by_index: dict[int, Prediction] = {}
    for group in order:
        frames = [Frame(*np.asarray(images[i]).shape[:2], size, resize) for i in group]
        batch = torch.stack([to_tensor(images[i], f) for i, f in zip(group, frames)]).to(device)
        kwargs = {}
        if boxes[group[0]] is not None:
            kwargs["boxes"] = _scale_coords(boxes[group[0]], frames[0], device).reshape(1, -1, 4)
        if points[group[0]] is not None:
            coords, labels = points[group[0]]
            kwargs["points"] = (
                _scale_coords(coords, frames[0], device).reshape(1, -1, 2),
                torch.as_tensor(labels, device=device).reshape(1, -1),
            )
        with autocast_for(device, True):
            out = model(batch, [prompts[i] for i in group], **kwargs)
        prob = torch.sigmoid(out.mask_logits.float())
        for j, i in enumerate(group):
            by_index[i] = _to_prediction(out, prob, j, frames[j], threshold)
    results = [by_index[i] for i in range(n)]
    return results


def _scale_coords(coords, frame: Frame, device) -> torch.Tensor:
    """Image-pixel x/y coordinates -> model-input pixels (as the image is placed by ``frame``)."""
    return frame.to_input_xy(torch.as_tensor(coords, dtype=torch.float32, device=device).reshape(-1, 2))


def _to_prediction(out, prob: torch.Tensor, j: int, frame: Frame, threshold: float) -> Prediction:
    def resize(x: torch.Tensor) -> np.ndarray:
        return frame.to_image(x[j].cpu())[0].numpy()

    p = resize(prob)
    mask = p > threshold
    # Saliency boxes may reach into the letterbox padding: clip them to the image.
    limit = torch.tensor([frame.width, frame.height] * 2, dtype=torch.float32)
    boxes = [torch.minimum(frame.to_image_xy(torch.tensor(b, dtype=torch.float32)), limit).tolist()
             for b, ok in zip(out.boxes[j].tolist(), out.box_valid[j].tolist()) if ok]
    return Prediction(
        mask=mask,
        probability=p.astype(np.float32),
        saliency=resize(out.refined_saliency).clip(0, 1).astype(np.float32),
        boxes=boxes,
        score=float(out.iou_pred[j].float().mean()),
        confidence=float(p[mask].mean()) if mask.any() else 0.0,
        raw_saliency=resize(out.saliency).clip(0, 1).astype(np.float32),
    )


def normalise(values: np.ndarray) -> np.ndarray:
    """H x W values rescaled to [0, 1] per image (min -> 0, max -> 1; a constant map -> 0)."""
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if not high - low > 1e-8:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def heatmap(values: np.ndarray) -> np.ndarray:
    """H x W in [0, 1] -> H x W x 3 uint8 with the 'jet' colour map (0 dark blue, 1 dark red)."""
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    return (cmap(np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def _rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """H x W x 3 uint8 copy of an image (array or PIL, any mode)."""
    return np.asarray(Image.fromarray(np.asarray(image)).convert("RGB")).copy()


def _line_width(shape: tuple[int, ...]) -> int:
    return max(1, min(shape[:2]) // 150)


def blend_saliency(image: np.ndarray | Image.Image, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """H x W x 3 uint8 image under the 'jet' heatmap of ``saliency`` (H x W), normalised per image.

    The whole image is tinted (weight ``alpha``), so low saliency shows as blue and the
    colours match :func:`colour_bar` (the image's least salient pixel -> 0, most salient -> 1).
    """
    img = _rgb(image).astype(np.float32)
    heat = heatmap(normalise(saliency)).astype(np.float32)
    return ((1 - alpha) * img + alpha * heat).round().astype(np.uint8)


def colour_bar(width: int, height: int) -> Image.Image:
    """A horizontal ``width`` x ``height`` 'jet' colour bar, 0 (left) to 1 (right)."""
    ramp = np.repeat(np.linspace(0.0, 1.0, max(width, 2), dtype=np.float32)[None, :width], max(height, 1), 0)
    return Image.fromarray(heatmap(ramp))


def draw_contour(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Paint the contour of ``mask`` (H x W bool) onto ``image`` (H x W x 3 uint8) in place."""
    edge = mask & ~ndimage.binary_erosion(mask, iterations=_line_width(image.shape))
    image[edge] = colour
    return image


def fill_mask(image: np.ndarray | Image.Image, mask: np.ndarray, colour: tuple[int, int, int],
              alpha: float = 0.45) -> np.ndarray:
    """H x W x 3 uint8 image with ``mask`` (H x W bool) tinted in ``colour`` and outlined."""
    out = _rgb(image).astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return draw_contour(out.astype(np.uint8), mask, colour)


def draw_boxes(image: np.ndarray | Image.Image, boxes: Sequence[Sequence[float]],
               colour: tuple[int, int, int] = BOX_COLOUR) -> Image.Image:
    """Image with the ``[x0, y0, x1, y1]`` boxes (image pixels) drawn as rectangles."""
    pil = Image.fromarray(_rgb(image))
    draw = ImageDraw.Draw(pil)
    for box in boxes:
        draw.rectangle(list(box), outline=colour, width=_line_width(np.asarray(pil).shape))
    return pil


def panels(image: np.ndarray | Image.Image, pred: Prediction,
           truth: np.ndarray | None = None) -> dict[str, Image.Image]:
    """Separate views of one prediction: ``image``, ``ground truth`` (yellow, if given),
    ``saliency`` (heatmap normalised per image, see :func:`colour_bar`), ``boxes`` (cyan box
    prompts) and ``predicted mask`` (green; the ground-truth contour in yellow for comparison)."""
    out = {"image": Image.fromarray(_rgb(image))}
    if truth is not None:
        out["ground truth"] = Image.fromarray(fill_mask(image, truth, TRUTH_COLOUR))
    out["saliency"] = Image.fromarray(blend_saliency(image, pred.heat))
    out["boxes"] = draw_boxes(image, pred.boxes)
    predicted = fill_mask(image, pred.mask, MASK_COLOUR)
    if truth is not None:
        draw_contour(predicted, truth, TRUTH_COLOUR)
    out["predicted mask"] = Image.fromarray(predicted)
    return out


def overlay(
    image: np.ndarray | Image.Image,
    pred: Prediction,
    truth: np.ndarray | None = None,
    alpha: float = 0.5,
    legend: bool = True,
) -> Image.Image:
    """Image with the saliency heatmap blended in, the mask contour (green), the ground-truth
    contour (yellow, if given) and the box prompts (cyan); with ``legend``, a band below the
    image (at its own size, top left) names each colour and shows the heatmap's colour bar."""
    out = blend_saliency(image, pred.heat, alpha)
    for mask, colour in ((truth, TRUTH_COLOUR), (pred.mask, MASK_COLOUR)):
        if mask is not None:
            draw_contour(out, mask, colour)
    drawn = draw_boxes(out, pred.boxes)
    return add_legend(drawn, truth is not None) if legend else drawn


def add_legend(image: Image.Image, truth: bool, min_width: int = 240) -> Image.Image:
    """``image`` above a dark legend band: predicted mask, ground truth (if ``truth``), box
    prompts and the saliency colour bar (low = the image's least salient pixel, high = its most).

    The canvas is ``max(W, min_width)`` wide; the image keeps its size at the top left.
    """
    from PIL import ImageFont

    width = max(image.width, min_width)
    size = int(np.clip(round(width / 30), 10, 24))
    font = ImageFont.load_default(size=size)
    swatch, gap, row = int(1.6 * size), size, int(1.7 * size)
    items: list[tuple[str, str | tuple[int, int, int]]] = [("predicted mask", MASK_COLOUR)]
    if truth:
        items.append(("ground truth", TRUTH_COLOUR))
    items += [("box prompts", "box"), ("saliency", "bar")]

    def text_width(text: str) -> int:
        return int(np.ceil(font.getlength(text)))

    bar = 5 * size
    widths = [swatch + size // 3 + text_width(label) if kind != "bar" else
              text_width("saliency: low ") + bar + text_width(" high") for label, kind in items]
    rows, x = [[]], gap // 2
    for item, w in zip(items, widths):
        if x + w > width - gap // 2 and rows[-1]:
            rows.append([])
            x = gap // 2
        rows[-1].append((item, x))
        x += w + gap
    canvas = Image.new("RGB", (width, image.height + row * len(rows) + size // 2), (28, 28, 32))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    line = max(2, size // 5)
    for r, entries in enumerate(rows):
        top = image.height + size // 4 + r * row
        mid = top + row // 2
        for (label, kind), x in entries:
            if kind == "bar":
                draw.text((x, mid), "saliency: low", fill="white", font=font, anchor="lm")
                x0 = x + text_width("saliency: low ")
                canvas.paste(colour_bar(bar, size), (x0, mid - size // 2))
                draw.text((x0 + bar + text_width(" "), mid), "high", fill="white", font=font, anchor="lm")
                continue
            if kind == "box":
                draw.rectangle([x, mid - size // 2, x + swatch, mid + size // 2], outline=BOX_COLOUR, width=line)
            else:
                draw.line([x, mid, x + swatch, mid], fill=kind, width=2 * line)
            draw.text((x + swatch + size // 3, mid), label, fill="white", font=font, anchor="lm")
    return canvas
