"""Pair sizes (same size or an integer super-resolution scale) and the random-crop sampler."""

from __future__ import annotations

from typing import Sequence

import torch

from .images import ImitationError


def output_scale(
    input_hw: Sequence[int], output_hw: Sequence[int], what: str = "the pair"
) -> int:
    """1 for same-size pairs, ``s`` when the output is exactly ``s`` times the input; else an error."""
    (h, w), (oh, ow) = tuple(input_hw), tuple(output_hw)
    if (oh, ow) == (h, w):
        return 1
    if oh % h == 0 and ow % w == 0 and oh // h == ow // w and oh // h >= 2:
        return oh // h
    raise ImitationError(
        f"{what}: input is {h}x{w} but output is {oh}x{ow}. Input and output must have the same size, "
        "or the output must be exactly an integer multiple s>=2 of the input in both dimensions "
        "(super-resolution, imitated with a pixel-shuffle head). Resize or crop one of them so they match."
    )


def check_pair(x: torch.Tensor, y: torch.Tensor, crop_size: int) -> int:
    """Validate an example pair ``(3,H,W)``/``(3,sH,sW)``; returns the scale ``s``."""
    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != 3 or y.shape[0] != 3:
        raise ImitationError(
            f"example pair must be two (3, H, W) images, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    scale = output_scale(x.shape[-2:], y.shape[-2:], what="example pair")
    h, w = x.shape[-2:]
    if crop_size > min(h, w):
        raise ImitationError(
            f"the example input is {h}x{w}, smaller than the training crop size {crop_size}: "
            f"use a larger example or set train.crop_size <= {min(h, w)}"
        )
    return scale


class RandomCropSampler:
    """Random aligned crops of one (input, output) pair, with a loss mask.

    A crop's outer ``margin`` pixels are computed by the student from padded (invented)
    context while the teacher saw the real image there, so they are masked out of the loss
    — except on sides where the crop touches the image edge, where the teacher also padded
    and the student must learn that behaviour.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        crop_size: int,
        batch_size: int,
        margin: int = 0,
        generator: torch.Generator | None = None,
    ):
        self.scale = check_pair(x, y, crop_size)
        if margin < 0 or 2 * margin >= crop_size:
            raise ImitationError(
                f"loss margin {margin} leaves nothing of a {crop_size}px crop: need 0 <= margin < crop/2"
            )
        self.x, self.y = x, y
        self.crop_size, self.batch_size, self.margin = (
            int(crop_size),
            int(batch_size),
            int(margin),
        )
        self.generator = (
            generator if generator is not None else torch.Generator().manual_seed(0)
        )

    def positions(self, n: int) -> torch.Tensor:
        h, w = self.x.shape[-2:]
        c = self.crop_size
        top = torch.randint(0, h - c + 1, (n,), generator=self.generator)
        left = torch.randint(0, w - c + 1, (n,), generator=self.generator)
        return torch.stack([top, left], dim=1)

    def crop(
        self, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, c, m = self.scale, self.crop_size, self.margin
        h, w = self.x.shape[-2:]
        xs, ys, masks = [], [], []
        for top, left in positions.tolist():
            xs.append(self.x[:, top : top + c, left : left + c])
            ys.append(self.y[:, s * top : s * (top + c), s * left : s * (left + c)])
            mask = torch.zeros(1, s * c, s * c)
            t0 = 0 if top == 0 else s * m
            l0 = 0 if left == 0 else s * m
            t1 = s * c if top + c == h else s * (c - m)
            l1 = s * c if left + c == w else s * (c - m)
            mask[:, t0:t1, l0:l1] = 1.0
            masks.append(mask)
        return torch.stack(xs), torch.stack(ys), torch.stack(masks)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x (B,3,c,c), y (B,3,sc,sc), mask (B,1,sc,sc))``."""
        return self.crop(self.positions(self.batch_size))
