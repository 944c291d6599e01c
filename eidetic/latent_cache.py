"""Cached VAE posteriors of the bordered training canvases.

The autoencoder is frozen and every canvas (interior plus its SolidMark key border) is
fixed for the whole run, so its posterior N(mean, std^2) is too: encoding each canvas once
(and its mirror image when flip augmentation is on) replaces a VAE forward pass per
training image per step. Training then draws ``(mean + std * eps) * scaling_factor`` with
the same ``eps`` the on-the-fly path would draw, so the batches are the same.

The cache is one safetensors file whose metadata holds a fingerprint of everything the
posteriors depend on: the VAE's weights, the canvases themselves (so the images, keys,
resolution and border) and whether mirrors are cached. A cache whose fingerprint differs
from the run's is never used: :meth:`LatentCache.prepare` raises a
:class:`~eidetic.errors.DataError` saying so (delete the file to rebuild it), because a
silently rebuilt cache would hide that the run directory's data or model changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from eidetic.errors import DataError
from eidetic.io import atomic_write

__all__ = ["LatentCache", "CACHE_FILE", "fingerprint"]

CACHE_FILE = "latents.safetensors"


def fingerprint(vae: torch.nn.Module, canvases: torch.Tensor, flips: bool) -> str:
    """SHA-256 over the VAE's parameters and buffers (name, dtype, shape, bytes), the canvases and ``flips``."""
    h = hashlib.sha256()
    for name, tensor in vae.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({"scaling_factor": float(vae.config.scaling_factor), "flips": bool(flips),
                         "canvases": list(canvases.shape)}).encode())
    h.update(canvases.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """Posterior means and stds of ``canvases()`` (and their mirrors), by canvas row.

    ``canvases`` is called once, when the cache is prepared: it returns every bordered canvas
    (N, 3, H, W) in [-1, 1], row ``i`` being the dataset's record ``i``.
    """

    def __init__(self, directory: str | Path, canvases: Callable[[], torch.Tensor], flips: bool, batch_size: int = 16):
        self.path = Path(directory) / CACHE_FILE
        self.canvases = canvases
        self.flips = bool(flips)
        self.batch_size = int(batch_size)
        self.mean: torch.Tensor | None = None  # (N, F, C, h, w) float32, F = 2 with mirrors (index 1)
        self.std: torch.Tensor | None = None
        self.scaling_factor = 1.0
        self.built = False  # True when prepare() encoded (rather than loaded) the cache

    @property
    def ready(self) -> bool:
        return self.mean is not None

    def prepare(self, vae: torch.nn.Module, write: bool = True) -> "LatentCache":
        """Load the cache file if its fingerprint matches ``vae`` and the canvases, else build (and write) it."""
        from safetensors import safe_open
        from safetensors.torch import save

        canvases = self.canvases()
        expected = fingerprint(vae, canvases, self.flips)
        self.scaling_factor = float(vae.config.scaling_factor)
        if self.path.is_file():
            with safe_open(str(self.path), framework="pt") as fh:
                found = (fh.metadata() or {}).get("fingerprint")
                if found != expected:
                    raise DataError(
                        f"the latent cache {self.path} was built from another autoencoder or data set (fingerprint "
                        f"{str(found)[:12]}..., this run's {expected[:12]}...): the run's images, keys, resolution, border, "
                        "flip setting or VAE weights changed since it was written. Delete the file to rebuild it, "
                        "or set data.cache_latents=false"
                    )
                self.mean, self.std = fh.get_tensor("mean"), fh.get_tensor("std")
            return self
        self.mean, self.std = self._encode(vae, canvases)
        self.built = True
        if write:
            payload = save({"mean": self.mean, "std": self.std}, metadata={"fingerprint": expected})
            with atomic_write(self.path, "wb") as fh:
                fh.write(payload)
        return self

    @torch.no_grad()
    def _encode(self, vae: torch.nn.Module, canvases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        param = next(vae.parameters())
        views = [canvases, canvases.flip(-1)] if self.flips else [canvases]
        means, stds = [], []
        for view in views:
            m, s = [], []
            for start in range(0, view.shape[0], self.batch_size):
                dist = vae.encode(view[start : start + self.batch_size].to(param)).latent_dist
                m.append(dist.mean.float().cpu())
                s.append(dist.std.float().cpu())
            means.append(torch.cat(m))
            stds.append(torch.cat(s))
        return torch.stack(means, 1).contiguous(), torch.stack(stds, 1).contiguous()

    def lookup(self, rows: torch.Tensor, flipped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of canvas ``rows`` (B,), mirrored where ``flipped`` (B,) is true."""
        if not self.ready:
            raise RuntimeError("LatentCache.lookup before prepare()")
        rows = torch.as_tensor(rows).long().cpu()
        view = torch.zeros_like(rows)
        if flipped is not None:
            flipped = torch.as_tensor(flipped).bool().cpu()
            if flipped.any() and not self.flips:
                raise RuntimeError("a flipped batch, but the latent cache holds no mirrored canvases")
            view = flipped.long()
        return self.mean[rows, view], self.std[rows, view]

    def sample(self, rows: torch.Tensor, flipped: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """Scaled posterior samples, drawing ``eps`` from ``generator`` as on-the-fly encoding does."""
        mean, std = self.lookup(rows, flipped)
        eps = torch.randn(mean.shape, generator=generator)
        return (mean + std * eps) * self.scaling_factor

    def means(self, rows: torch.Tensor) -> torch.Tensor:
        """Scaled posterior means of the unflipped canvases ``rows`` (what ``DiffusionModel.encode_images`` gives)."""
        return self.lookup(rows)[0] * self.scaling_factor
