"""Where an image of its own size sits in the model's square input, and the way back.

SAM takes an S x S input. Colonoscopy frames are not square (1280 x 1024, 384 x 288, ...), so
each image is placed by a :class:`Frame`:

* ``"letterbox"`` (the default, SAM's own preprocessing): the longer side is scaled to S, the
  aspect ratio kept, and the input padded with zeros at the bottom or right;
* ``"squash"``: both sides scaled to S, the aspect ratio lost (the recipe of earlier versions).

Predictions go back the same way: the padding is cropped and the rest resized to the image's
own H x W, where test metrics are computed (see
:func:`shared_model.training.evaluate.evaluate_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ("letterbox", "squash")


def check_resize(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`RESIZE_MODES`, else raise ValueError naming it."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {list(RESIZE_MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Frame:
    """An H x W image placed in an S x S model input.

    Attributes:
        height: H, the image's own height (pixels).
        width: W, the image's own width.
        size: S, the side of the model input.
        mode: ``"letterbox"`` or ``"squash"``.
    """

    height: int
    width: int
    size: int
    mode: str = "letterbox"

    def __post_init__(self) -> None:
        check_resize(self.mode)
        if min(self.height, self.width, self.size) < 1:
            raise ValueError(f"frame sides must be >= 1, got {self.height}x{self.width} -> {self.size}")

    @property
    def content(self) -> tuple[int, int]:
        """``(h, w)``: the part of the S x S input the image covers (the rest is padding)."""
        if self.mode == "squash":
            return self.size, self.size
        scale = self.size / max(self.height, self.width)
        return (max(1, min(self.size, round(self.height * scale))),
                max(1, min(self.size, round(self.width * scale))))

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Input pixels per image pixel along x and y."""
        h, w = self.content
        return w / self.width, h / self.height

    def image(self, img: Image.Image) -> np.ndarray:
        """An RGB PIL image -> S x S x 3 uint8 input (bilinear, antialiased; zero padding)."""
        h, w = self.content
        rgb = np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.uint8)
        return self._pad(rgb)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """An H x W bool mask -> S x S bool (nearest neighbour; padding is background)."""
        h, w = self.content
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        return self._pad(small)

    def _pad(self, arr: np.ndarray) -> np.ndarray:
        h, w = arr.shape[:2]
        if (h, w) == (self.size, self.size):
            return np.array(arr, copy=True, order="C")
        out = np.zeros((self.size, self.size) + arr.shape[2:], dtype=arr.dtype)
        out[:h, :w] = arr
        return out

    def to_image(self, values: torch.Tensor) -> torch.Tensor:
        """Input-space maps -> the image's own size: crop the padding, resize bilinearly.

        Args:
            values: C x S x S (probabilities, logits or saliency).

        Returns:
            C x H x W float.
        """
        h, w = self.content
        crop = values[None, :, :h, :w].float()
        return F.interpolate(crop, size=(self.height, self.width), mode="bilinear", align_corners=False)[0]

    def crop(self, values: torch.Tensor) -> torch.Tensor:
        """The content part of a ... x S x S tensor (no resizing)."""
        h, w = self.content
        return values[..., :h, :w]

    def to_input_xy(self, xy: torch.Tensor) -> torch.Tensor:
        """Image-pixel coordinates (... x 2, or ... x 4 boxes as x0, y0, x1, y1) -> input pixels."""
        sx, sy = self.scale_xy
        scale = torch.tensor([sx, sy] * (xy.shape[-1] // 2), dtype=xy.dtype, device=xy.device)
        return xy * scale

    def to_image_xy(self, xy: torch.Tensor) -> torch.Tensor:
        """Input-pixel coordinates (... x 2 or ... x 4) -> the image's own pixels."""
        sx, sy = self.scale_xy
        scale = torch.tensor([1 / sx, 1 / sy] * (xy.shape[-1] // 2), dtype=xy.dtype, device=xy.device)
        return xy * scale
