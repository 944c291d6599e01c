"""The empirical optimal denoiser: ground truth for every memorization metric.

For a finite training set {x_i} the exact minimiser of the diffusion loss is the
posterior mean E[x0 | x_t] = sum_i w_i x_i with
w_i = softmax_i(-||x_t - sqrt(abar_t) x_i||^2 / (2 (1 - abar_t))).
A model that *is* this function memorizes perfectly, so SolidMark must recover its keys and
extraction probes must flag its prompts.

Conditioning: each training item may carry a caption embedding. A query whose
``encoder_hidden_states`` equal (to a tolerance) some training embeddings is denoised
against those items only; a query that matches none (the empty/unconditional prompt, an
unseen caption) is denoised against the whole set. So a caption shared by one image maps
to that image, a caption shared by many maps to their mixture.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

__all__ = ["EmpiricalDenoiser"]


class EmpiricalDenoiser(nn.Module):
    """Drop-in replacement for a ``UNet2DConditionModel`` that predicts epsilon exactly.

    Args:
        data: (N, C, H, W) training items in the space the UNet works in (scaled latents
            for latent models, pixels in [-1, 1] otherwise).
        alphas_cumprod: the training scheduler's cumulative alphas.
        embeddings: optional (N, L, D) caption embeddings of the items (same encoder that
            will produce ``encoder_hidden_states`` at query time).
        tolerance: relative distance under which a query embedding counts as a match.
    """

    def __init__(self, data: torch.Tensor, alphas_cumprod: torch.Tensor, embeddings: torch.Tensor | None = None, tolerance: float = 1e-4):
        super().__init__()
        self.register_buffer("data", data.detach().float().clone())
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone())
        if embeddings is not None:
            if embeddings.shape[0] != data.shape[0]:
                raise ValueError("need one caption embedding per training item")
            self.register_buffer("embeddings", embeddings.detach().float().flatten(1).clone())
        else:
            self.embeddings = None
        self.tolerance = float(tolerance)
        n, c, h, w = data.shape
        self.config = SimpleNamespace(in_channels=c, out_channels=c, sample_size=h)

    def membership(self, encoder_hidden_states: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, N) boolean: which training items each query may be denoised against."""
        n = self.data.shape[0]
        if self.embeddings is None or encoder_hidden_states is None:
            return torch.ones(batch, n, dtype=torch.bool, device=self.data.device)
        q = encoder_hidden_states.float().flatten(1)
        # the matrix-multiply shortcut cdist takes past 25 rows errs by ~1e-3, above the
        # match tolerance: compute distances directly
        dist = torch.cdist(q, self.embeddings, compute_mode="donot_use_mm_for_euclid_dist")
        scale = self.embeddings.norm(dim=1).clamp_min(1e-8)
        match = dist <= self.tolerance * scale.unsqueeze(0)
        none = ~match.any(dim=1, keepdim=True)
        return match | none  # unmatched queries see the whole set

    def posterior_mean(self, x_t: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states=None) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps.long()].view(-1, 1)
        flat_x = x_t.float().flatten(1)
        flat_d = self.data.flatten(1)
        # ||x_t - sqrt(a) x_i||^2 without materialising (B, N, D)
        sq = (flat_x**2).sum(1, keepdim=True) - 2 * a.sqrt() * flat_x @ flat_d.T + a * (flat_d**2).sum(1).unsqueeze(0)
        logits = -sq / (2 * (1 - a))
        member = self.membership(encoder_hidden_states, x_t.shape[0])
        logits = logits.masked_fill(~member, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        return (weights @ flat_d).view_as(x_t)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict: bool = True, **_):
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        x0 = self.posterior_mean(sample, t, encoder_hidden_states)
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        eps = (sample.float() - a.sqrt() * x0) / (1 - a).sqrt()
        eps = eps.to(sample.dtype)
        return SimpleNamespace(sample=eps) if return_dict else (eps,)
