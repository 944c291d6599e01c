"""Inference-time memorization mitigations, as the papers ran them, over captions and tensors.

Caption changes at query time (SolidMark's evaluation protocol, Kriplani et al. 2025, which
uses Somepalli et al.'s ``prompt_augmentation``; Wen et al. 2024 run the same baselines):
each inserts ``count`` (their ``repeat_num``; SolidMark's default 2) words, one at a time, at
a uniformly random position of the caption split on single spaces:

* ``random_number`` ("RNA"): a random integer in [0, 100000) written as a word;
* ``random_token`` ("RWA"): ``tokenizer.decode([id])`` of a random token id of the
  tokenizer's vocabulary (their code: ``randint(49400)`` on CLIP's 49,408 ids, i.e. every id
  but the special ones at the end; here: every id but the tokenizer's special ids);
* ``repeat_word`` ("CWR"): a word drawn from the ORIGINAL caption's words, each time.

Gaussian noise on the text embeddings: ``hidden + sigma * N(0, 1)`` on the conditional
embedding (SolidMark: sigma = strength / 10). The unconditional (empty-caption) embedding is
never changed.

Delayed guidance (Jain et al., CVPR 2025, static transition point): at timesteps
``t > transition`` the guidance scale is ``guidance_before`` (their code: 0, i.e. the
unconditional prediction; negative values are their "opposite guidance", e.g. -2), at
``t <= transition`` the caller's own scale (their default transition 500 of 1000). With
``transition >= num_train_timesteps - 1`` nothing changes; with ``transition = -1`` every
step uses ``guidance_before``. Their script also switches to a 200-step schedule at the
transition; that is not reproduced (the caller's schedule is kept).

Prompt-embedding adjustment (Wen et al., ICLR 2024, inference-time mitigation): before
sampling, at the first sampling step's input x_T, a few AdamW steps (lr 0.05, at most 10)
on the conditional embedding lower ``||eps(x_T, c) - eps(x_T, '')||_2``; a caption stops as
soon as its norm is at most ``target_loss`` (their README's 3, on SD v1's 4x64x64 latents),
the first (start-of-text) token's gradient is zeroed, the unconditional embedding is left as
it is.

Every random draw is a pure function of (seed, caption), so a caption gets the same change at
every evaluation, whatever the batch it is in.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = [
    "CAPTION_CHANGES", "insert_word", "random_number_addition", "random_token_addition", "word_repetition",
    "change_caption", "caption_rng", "caption_generator", "token_id_pool", "embedding_noise",
    "guidance_at", "wen_adjust_embeddings", "WenAdjustment", "InferenceMitigation", "MitigatedDiffusionModel", "mitigate",
]

CAPTION_CHANGES = ("random_number", "random_token", "repeat_word")


# ---- seeding ----------------------------------------------------------------------------------
def _caption_seed(seed: int, caption: str, salt: int) -> int:
    return ((int(seed) * 1_000_003 + zlib.crc32(caption.encode("utf-8"))) * 7_919 + salt) % (2**63)


def caption_rng(seed: int, caption: str, salt: int = 0) -> random.Random:
    """A ``random.Random`` that is a pure function of (seed, caption, salt)."""
    return random.Random(_caption_seed(seed, caption, salt))


def caption_generator(seed: int, caption: str, salt: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` that is a pure function of (seed, caption, salt)."""
    return torch.Generator().manual_seed(_caption_seed(seed, caption, salt))


# ---- caption changes --------------------------------------------------------------------------
def insert_word(caption: str, word: str, rng: random.Random) -> str:
    """``word`` inserted at a uniformly random position of ``caption.split(' ')`` (their ``insert_rand_word``)."""
    words = caption.split(" ")
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def random_number_addition(caption: str, rng: random.Random, count: int = 2, high: int = 100_000) -> str:
    """Insert ``count`` random integers in [0, high), one at a time (SolidMark's RNA)."""
    for _ in range(count):
        caption = insert_word(caption, str(rng.randrange(high)), rng)
    return caption


def token_id_pool(tokenizer) -> list[int]:
    """The ids random token addition draws from: the whole vocabulary but the special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]


def random_token_addition(caption: str, rng: random.Random, tokenizer, count: int = 2,
                          pool: Sequence[int] | None = None) -> tuple[str, list[int]]:
    """Insert ``count`` decoded random token ids, one at a time (SolidMark's RWA); returns the
    caption and the ids drawn."""
    pool = list(pool) if pool is not None else token_id_pool(tokenizer)
    if not pool:
        raise ValueError("random token addition needs a tokenizer with at least one non-special token")
    ids = []
    for _ in range(count):
        token = pool[rng.randrange(len(pool))]
        ids.append(token)
        caption = insert_word(caption, tokenizer.decode([token]), rng)
    return caption, ids


def word_repetition(caption: str, rng: random.Random, count: int = 2) -> str:
    """Insert ``count`` words drawn from the original caption's words (SolidMark's CWR)."""
    words = caption.split(" ")
    for _ in range(count):
        caption = insert_word(caption, rng.choice(words), rng)
    return caption


def change_caption(caption: str, method: str, rng: random.Random, count: int = 2, tokenizer=None,
                   number_high: int = 100_000, pool: Sequence[int] | None = None) -> str:
    """One of :data:`CAPTION_CHANGES` applied to ``caption``."""
    if method == "random_number":
        return random_number_addition(caption, rng, count, number_high)
    if method == "random_token":
        if tokenizer is None:
            raise ValueError("random_token needs the model's tokenizer")
        return random_token_addition(caption, rng, tokenizer, count, pool)[0]
    if method == "repeat_word":
        return word_repetition(caption, rng, count)
    raise ValueError(f"unknown caption change {method!r}; choose from {', '.join(CAPTION_CHANGES)}")


# ---- embeddings -------------------------------------------------------------------------------
def embedding_noise(hidden: torch.Tensor, sigma: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``hidden + sigma * N(0, 1)``, one CPU draw of (L, D) per row from its generator."""
    if sigma < 0:
        raise ValueError(f"embedding noise sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return hidden
    noise = torch.stack([torch.randn(hidden.shape[1:], generator=g) for g in generators]).to(hidden)
    return hidden + sigma * noise


# ---- guidance ---------------------------------------------------------------------------------
def guidance_at(t: int, guidance: float, transition: int, guidance_before: float = 0.0) -> float:
    """Jain et al.'s static transition point: ``guidance_before`` while ``t > transition``, else ``guidance``."""
    return float(guidance_before) if int(t) > int(transition) else float(guidance)


# ---- Wen et al.'s prompt-embedding adjustment --------------------------------------------------
@dataclass
class WenAdjustment:
    embeddings: torch.Tensor  # adjusted conditional embeddings (B, L, D)
    norms_before: torch.Tensor  # ||eps_c - eps_u|| per caption at x_T before ...
    norms_after: torch.Tensor  # ... and after the adjustment
    iterations: torch.Tensor  # gradient steps taken per caption


def wen_adjust_embeddings(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int = 10,
    lr: float = 0.05,
    target_loss: float | None = 3.0,
    skip_first_token: bool = True,
) -> WenAdjustment:
    """Lower ``||predict(x_t, t, c) - predict(x_t, t, uncond)||_2`` per caption by AdamW on ``c``.

    ``predict(x, t, hidden) -> eps``. Each caption is optimised on its own (AdamW is
    element-wise, and a caption that reached ``target_loss`` is frozen where it is), as
    Wen et al.'s code does for one prompt at a time; ``uncond`` is never changed.
    """
    b = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).reshape(-1)
    t = t.expand(b) if t.numel() == 1 else t
    uncond = uncond.detach()
    if uncond.shape[0] == 1 and b > 1:
        uncond = uncond.expand(b, *uncond.shape[1:])
    x = x_t.detach()
    with torch.no_grad():
        eps_u = predict(x, t, uncond).float()
    emb = cond.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.AdamW([emb], lr=lr)  # their optimizer, torch's defaults otherwise
    done = torch.zeros(b, dtype=torch.bool, device=emb.device)
    iterations = torch.zeros(b, dtype=torch.long)

    def norms_now() -> torch.Tensor:
        return (predict(x, t, emb.to(cond.dtype)).float() - eps_u).flatten(1).norm(dim=1)

    with torch.enable_grad():
        norms = norms_now()
        before = norms.detach().clone()
        for _ in range(int(steps)):
            if target_loss is not None:
                done |= norms.detach() <= target_loss
            if bool(done.all()):
                break
            (grad,) = torch.autograd.grad(norms.sum(), [emb])
            if skip_first_token:
                grad[:, 0] = 0
            grad[done] = 0
            frozen = emb.detach()[done].clone()
            emb.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                emb[done] = frozen
            iterations += (~done).cpu().long()
            norms = norms_now()
    after = norms.detach()
    return WenAdjustment(embeddings=emb.detach().to(cond.dtype), norms_before=before, norms_after=after, iterations=iterations)


# ---- the whole inference-time setting over a DiffusionModel ----------------------------------
@dataclass
class InferenceMitigation:
    """What to change at query time; the defaults change nothing."""

    captions: Sequence[str] = ()  # caption changes, in order: random_number | random_token | repeat_word
    count: int = 2  # words inserted per change (SolidMark / Somepalli: repeat_num)
    number_high: int = 100_000
    text_noise_sigma: float = 0.0
    delayed_guidance: bool = False
    transition: int = 500
    guidance_before: float = 0.0
    wen: bool = False
    wen_steps: int = 10
    wen_lr: float = 0.05
    wen_target_loss: float | None = 3.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(self.captions) or self.text_noise_sigma > 0 or self.delayed_guidance or self.wen

    @classmethod
    def from_settings(cls, s) -> "InferenceMitigation":
        """From an ``inference_mitigation`` config section (:class:`eidetic.schema.train.InferenceMitigationSettings`)."""
        return cls(
            captions=tuple(s.captions), count=int(s.count), number_high=int(s.number_high), text_noise_sigma=float(s.text_noise_sigma),
            delayed_guidance=bool(s.delayed_guidance.enabled), transition=int(s.delayed_guidance.transition),
            guidance_before=float(s.delayed_guidance.guidance_before), wen=bool(s.wen.enabled), wen_steps=int(s.wen.steps),
            wen_lr=float(s.wen.lr), wen_target_loss=None if s.wen.target_loss is None else float(s.wen.target_loss), seed=int(s.seed),
        )


def _find_tokenizer(encode_prompt):
    for obj in (encode_prompt, getattr(encode_prompt, "__wrapped__", None), getattr(encode_prompt, "__self__", None)):
        tok = getattr(obj, "tokenizer", None)
        if tok is not None:
            return tok
    return None


class MitigatedDiffusionModel:
    """A :class:`~eidetic.diffusion.DiffusionModel` with an :class:`InferenceMitigation` applied
    wherever it is queried: ``encode_prompt`` changes captions and adds embedding noise (the
    empty caption, the unconditional prompt, is never changed); ``predict_noise`` adjusts a
    conditional embedding by Wen et al.'s steps at the first call that uses it (the first
    sampling step's input) and delays classifier-free guidance in guided calls. Everything else
    is the wrapped model's.
    """

    def __init__(self, model, mitigation: InferenceMitigation, tokenizer=None):
        self._model = model
        self.mitigation = mitigation
        self.tokenizer = tokenizer if tokenizer is not None else _find_tokenizer(model.encode_prompt)
        if "random_token" in mitigation.captions and self.tokenizer is None:
            raise ValueError("random_token needs the model's tokenizer; pass tokenizer=")
        self._pool = token_id_pool(self.tokenizer) if "random_token" in mitigation.captions else None
        self._uncond = None
        self._adjusted: tuple[torch.Tensor, torch.Tensor] | None = None  # (cond as given, adjusted)
        self.wen_log: list[WenAdjustment] = []
        self.changed_captions: dict[str, str] = {}

    def __getattr__(self, name):  # geometry, encode/decode, add_noise, ... of the wrapped model
        return getattr(self._model, name)

    @property
    def unet_evals(self) -> int:
        return self._model.unet_evals

    @unet_evals.setter
    def unet_evals(self, value: int) -> None:
        self._model.unet_evals = value

    # ---- captions and embeddings -----------------------------------------------------------
    def change(self, caption: str) -> str:
        m = self.mitigation
        if caption == "" or not m.captions:
            return caption
        new = caption
        for k, method in enumerate(m.captions):
            new = change_caption(new, method, caption_rng(m.seed, caption, salt=k), m.count, self.tokenizer, m.number_high, self._pool)
        return new

    def encode_prompt(self, captions: Sequence[str]) -> torch.Tensor:
        captions = list(captions)
        changed = [self.change(c) for c in captions]
        for c, n in zip(captions, changed):
            if n != c:
                self.changed_captions[c] = n
        hidden = self._model.encode_prompt(changed)
        sigma = self.mitigation.text_noise_sigma
        if sigma > 0:
            rows = [i for i, c in enumerate(captions) if c != ""]
            if rows:
                gens = [caption_generator(self.mitigation.seed, captions[i], salt=101) for i in rows]
                hidden = hidden.clone()
                hidden[rows] = embedding_noise(hidden[rows], sigma, gens)
        return hidden

    def unconditional(self) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = self._model.encode_prompt([""]).detach()
        return self._uncond

    # ---- the network ---------------------------------------------------------------------------
    def _wen(self, x_t, timesteps, cond):
        if self._adjusted is not None and self._adjusted[0] is cond:
            return self._adjusted[1]
        m = self.mitigation
        uncond = self.unconditional().to(cond.device, cond.dtype)
        is_uncond = (cond == uncond).flatten(1).all(dim=1)  # rows that are the unconditional prompt stay as they are
        rows = (~is_uncond).nonzero().flatten()
        adjusted = cond.clone()
        if rows.numel():
            b = x_t.shape[0]
            t = torch.as_tensor(timesteps, device=x_t.device).reshape(-1)
            t = t.expand(b) if t.numel() == 1 else t

            # the wrapped model's unguided prediction (it counts its UNet evaluations)
            result = wen_adjust_embeddings(self._model.predict_noise, x_t[rows], t[rows], cond[rows], uncond, m.wen_steps, m.wen_lr,
                                           m.wen_target_loss)
            adjusted[rows] = result.embeddings
            self.wen_log.append(result)
        self._adjusted = (cond, adjusted)
        return adjusted

    def predict_noise(self, x_t, timesteps, cond, uncond=None, guidance: float = 1.0):
        m = self.mitigation
        if m.wen:
            cond = self._wen(x_t, timesteps, cond)
        guided = uncond is not None and guidance != 1.0
        if m.delayed_guidance and guided:
            t = torch.as_tensor(timesteps).reshape(-1).cpu()
            if t.numel() > 1 and not bool((t == t[0]).all()):
                # per-item timesteps: split by the side of the transition each is on
                late = t <= m.transition
                out = torch.empty_like(x_t)
                u = uncond if uncond.shape[0] != 1 else uncond.expand(x_t.shape[0], *uncond.shape[1:])
                for mask, g in ((late, guidance), (~late, m.guidance_before)):
                    if mask.any():
                        rows = mask.to(x_t.device)
                        out[rows] = self._predict(x_t[rows], t[mask].to(x_t.device), cond[rows], u[rows], g).to(out.dtype)
                return out
            guidance = guidance_at(int(t[0]), guidance, m.transition, m.guidance_before)
        return self._predict(x_t, timesteps, cond, uncond, guidance)

    def _predict(self, x_t, timesteps, cond, uncond, guidance):
        return self._model.predict_noise(x_t, timesteps, cond, uncond, guidance)


def mitigate(model, mitigation: InferenceMitigation | None, tokenizer=None):
    """``model`` with ``mitigation`` applied (the model itself when there is nothing to apply)."""
    if mitigation is None or not mitigation.active:
        return model
    return MitigatedDiffusionModel(model, mitigation, tokenizer=tokenizer)
