"""Students: small CNNs trained on crops of the single example."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .images import ImitationError


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    # reflect padding: the classical teachers pad by reflection too, so image edges match
    return nn.Conv2d(
        cin, cout, k, padding=k // 2, padding_mode="reflect" if k > 1 else "zeros"
    )


class _Head(nn.Module):
    """Residual output: nearest-upsampled input + pixel-shuffled correction (scale 1: a plain residual)."""

    def __init__(self, width: int, kernel_size: int, scale: int):
        super().__init__()
        self.scale = scale
        self.proj = _conv(width, 3 * scale * scale, kernel_size)
        nn.init.zeros_(
            self.proj.weight
        )  # start as the identity/nearest-neighbour baseline
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        residual = self.proj(features)
        base = x
        if self.scale > 1:
            residual = F.pixel_shuffle(residual, self.scale)
            base = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return base + residual


class PlainCNN(nn.Module):
    """``depth`` convolutions of ``width`` channels with ReLU; receptive field 1 + depth*(k-1)."""

    def __init__(
        self, width: int = 32, depth: int = 6, kernel_size: int = 3, scale: int = 1
    ):
        super().__init__()
        if depth < 2:
            raise ImitationError(
                f"student.depth must be >= 2 for the plain CNN, got {depth}"
            )
        if kernel_size % 2 == 0:
            raise ImitationError(f"student.kernel_size must be odd, got {kernel_size}")
        layers: list[nn.Module] = [_conv(3, width, kernel_size), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [_conv(width, width, kernel_size), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = _Head(width, kernel_size, scale)
        self.config = {
            "arch": "cnn",
            "width": width,
            "depth": depth,
            "kernel_size": kernel_size,
            "scale": scale,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x - 0.5), x)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, n: int):
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [_conv(cin if i == 0 else cout, cout, k), nn.ReLU()]
        super().__init__(*layers)


class SmallUNet(nn.Module):
    """A small UNet: ``depth`` downsamplings (avg-pool), width doubling per level, skip concat.

    Inputs whose sides are not divisible by 2**depth are reflect-padded and cropped back.
    """

    def __init__(
        self,
        width: int = 32,
        depth: int = 2,
        kernel_size: int = 3,
        scale: int = 1,
        blocks_per_level: int = 1,
    ):
        super().__init__()
        if depth < 1:
            raise ImitationError(
                f"student.depth (UNet levels) must be >= 1, got {depth}"
            )
        if kernel_size % 2 == 0:
            raise ImitationError(f"student.kernel_size must be odd, got {kernel_size}")
        widths = [width * 2**i for i in range(depth + 1)]
        self.stem = _Block(3, widths[0], kernel_size, blocks_per_level)
        self.down = nn.ModuleList(
            _Block(widths[i], widths[i + 1], kernel_size, blocks_per_level)
            for i in range(depth)
        )
        self.up = nn.ModuleList(
            _Block(widths[i + 1] + widths[i], widths[i], kernel_size, blocks_per_level)
            for i in reversed(range(depth))
        )
        self.head = _Head(widths[0], kernel_size, scale)
        self.depth = depth
        self.config = {
            "arch": "unet",
            "width": width,
            "depth": depth,
            "kernel_size": kernel_size,
            "scale": scale,
            "blocks_per_level": blocks_per_level,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mult = 2**self.depth
        ph, pw = (-h) % mult, (-w) % mult
        xp = F.pad(x, (0, pw, 0, ph), mode="reflect") if (ph or pw) else x
        feats = [self.stem(xp - 0.5)]
        for block in self.down:
            feats.append(block(F.avg_pool2d(feats[-1], 2)))
        out = feats.pop()
        for block in self.up:
            skip = feats.pop()
            out = block(
                torch.cat(
                    [F.interpolate(out, size=skip.shape[-2:], mode="nearest"), skip],
                    dim=1,
                )
            )
        y = self.head(out, xp)
        s = self.head.scale
        return y[..., : s * h, : s * w]


def build_student(
    arch: str,
    width: int,
    depth: int,
    kernel_size: int = 3,
    scale: int = 1,
    blocks_per_level: int = 1,
) -> nn.Module:
    if arch == "cnn":
        return PlainCNN(width=width, depth=depth, kernel_size=kernel_size, scale=scale)
    if arch == "unet":
        return SmallUNet(
            width=width,
            depth=depth,
            kernel_size=kernel_size,
            scale=scale,
            blocks_per_level=blocks_per_level,
        )
    raise ImitationError(f"unknown student.arch {arch!r}: choose 'cnn' or 'unet'")


def receptive_field(student: nn.Module, probe: int = 65) -> int:
    """Side (input pixels) of the region that influences one central output pixel, measured by gradient.

    Measured rather than derived so it holds for any architecture; capped at ``probe``.
    Uses a copy with random head weights (the real head starts at zero, hiding the body).
    """
    import copy

    net = copy.deepcopy(student).float().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * 0.1)
    x = torch.rand(
        1,
        3,
        probe,
        probe,
        generator=torch.Generator().manual_seed(0),
        requires_grad=True,
    )
    y = net(x)
    s = y.shape[-1] // probe
    c = (probe // 2) * s
    y[0, :, c, c].sum().backward()
    g = x.grad[0].abs().sum(0)
    g[probe // 2, probe // 2] = max(
        float(g[probe // 2, probe // 2]), 1e-30
    )  # the pixel itself (residual path)
    rows = torch.nonzero(g.sum(1) > 0).flatten()
    cols = torch.nonzero(g.sum(0) > 0).flatten()
    return int(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)


@torch.no_grad()
def apply_student(student: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Student on a ``(3,H,W)`` or ``(B,3,H,W)`` image in [0,1]; output clipped to [0,1]."""
    was_training = student.training
    student.eval()
    single = x.ndim == 3
    param = next(student.parameters())
    out = (
        student((x[None] if single else x).to(param.device, param.dtype))
        .clamp(0, 1)
        .float()
        .cpu()
    )
    student.train(was_training)
    return out[0] if single else out


def identity_prediction(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The do-nothing baseline: the input itself (nearest-upsampled for super-resolution)."""
    if scale == 1:
        return x
    return F.interpolate(x[None], scale_factor=scale, mode="nearest")[0]
