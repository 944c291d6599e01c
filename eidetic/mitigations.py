"""Memorization mitigations as pure functions over captions, embeddings, images and tensors.

Caption-side (Somepalli, Singla, Goldblum, Geiping, Goldstein, "Understanding and Mitigating
Copying in Diffusion Models", NeurIPS 2023, Sec. 6): at training time a caption is
perturbed with probability ``prob``:

* ``random_number``  – "random numbers addition": append a random integer as a word;
* ``random_word``    – "random token addition": insert the decoded text of a random token id
  of the tokenizer's vocabulary (their code: ``tokenizer.decode(randint(49400))``);
* ``caption_word``   – a variant of it (not the papers'): insert a random word of the
  dataset's caption vocabulary;
* ``repeat_word``    – "caption word repetition": repeat one word of the caption at a random
  position;
* ``randomize``      – "random caption replacement": replace the caption by random words;
* ``dropout``        – drop the caption entirely (the empty caption);
* ``gaussian_noise_embeddings`` – "Gaussian noise in text embeddings" (their GNI): add
  N(0, sigma^2) noise to the encoder's hidden states.

Data-side: near-duplicate removal on a perceptual distance (RMS of downsampled grey-level
images, the "pixel + downsampling" copy detector family; Somepalli et al. 2023 and Carlini
et al. 2023 use similar thresholded distances); horizontal flip augmentation.

Loss-side (Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in
Diffusion Models", ICLR 2024, Sec. 5): during training, skip samples whose text-conditional
noise-prediction magnitude ``||eps(x_t, c) - eps(x_t, '')||`` exceeds a threshold.

Every random choice takes an explicit seeded generator (``random.Random`` for text,
``torch.Generator`` for tensors), so a mitigation never touches global RNG state and a
resumed run draws the same perturbations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CAPTION_METHODS",
    "random_number_addition",
    "random_word_addition",
    "random_token_addition",
    "repeat_word",
    "randomize_caption",
    "drop_caption",
    "perturb_captions",
    "caption_vocabulary",
    "embedding_noise",
    "random_flip",
    "perceptual_features",
    "near_duplicates",
    "NearDuplicate",
    "conditional_noise_norm",
    "wen_keep_mask",
    "step_rng",
    "step_generator",
]


def step_rng(seed: int, step: int, micro: int = 0, salt: int = 0) -> random.Random:
    """A ``random.Random`` that is a pure function of (seed, step, micro-batch, salt)."""
    return random.Random(((seed * 1_000_003 + step) * 1_009 + micro) * 7_919 + salt)


def step_generator(seed: int, step: int, micro: int = 0, salt: int = 0) -> torch.Generator:
    """A ``torch.Generator`` that is a pure function of (seed, step, micro-batch, salt)."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + step) * 1_009 + micro) * 7_919 + salt) % (2**63))


# ---- caption-side ---------------------------------------------------------------------------
def random_number_addition(caption: str, rng: random.Random, low: int = 0, high: int = 10**6) -> str:
    """Insert a random integer in [low, high) as a word at a random position (Somepalli et al. 2023)."""
    words = caption.split()
    words.insert(rng.randint(0, len(words)), str(rng.randrange(low, high)))
    return " ".join(words)


def random_token_addition(caption: str, rng: random.Random, tokenizer, pool: Sequence[int] | None = None) -> str:
    """Insert the decoded text of one random token id (the vocabulary's non-special ids, or
    ``pool``) at a random position (Somepalli et al. 2023's random token addition)."""
    from eidetic.inference_mitigations import random_token_addition as insert_tokens, token_id_pool

    words = caption.split()  # same word split as the other training-time changes
    pool = list(pool) if pool is not None else token_id_pool(tokenizer)
    return insert_tokens(" ".join(words), rng, tokenizer, count=1, pool=pool)[0]


def random_word_addition(caption: str, rng: random.Random, vocabulary: Sequence[str]) -> str:
    """Insert a random word of ``vocabulary`` at a random position (the caption-vocabulary variant)."""
    if not vocabulary:
        raise ValueError("random_word_addition needs a non-empty vocabulary")
    words = caption.split()
    words.insert(rng.randint(0, len(words)), rng.choice(list(vocabulary)))
    return " ".join(words)


def repeat_word(caption: str, rng: random.Random) -> str:
    """Repeat one randomly chosen word of the caption at a random position (Somepalli et al. 2023)."""
    words = caption.split()
    if not words:
        return caption
    words.insert(rng.randint(0, len(words)), rng.choice(words))
    return " ".join(words)


def randomize_caption(caption: str, rng: random.Random, vocabulary: Sequence[str], length: int | None = None) -> str:
    """Replace the caption by random vocabulary words (same length by default; Somepalli et al. 2023)."""
    if not vocabulary:
        raise ValueError("randomize_caption needs a non-empty vocabulary")
    n = length if length is not None else max(1, len(caption.split()))
    vocab = list(vocabulary)
    return " ".join(rng.choice(vocab) for _ in range(n))


def drop_caption(caption: str, rng: random.Random) -> str:
    """The empty caption (caption dropout)."""
    return ""


CAPTION_METHODS = ("random_number", "random_word", "caption_word", "repeat_word", "randomize", "dropout")


def perturb_captions(
    captions: Sequence[str], methods: Sequence[str], prob: float, rng: random.Random, vocabulary: Sequence[str] = (),
    tokenizer=None, token_pool: Sequence[int] | None = None,
) -> tuple[list[str], list[bool]]:
    """Apply each of ``methods`` (composed, in order) to each caption with probability ``prob``.

    ``random_word`` needs the model's ``tokenizer`` (ids drawn from ``token_pool``, default its
    non-special ids); ``caption_word`` and ``randomize`` need ``vocabulary``.

    Returns the new captions and, per caption, whether any method changed it.
    """
    unknown = [m for m in methods if m not in CAPTION_METHODS]
    if unknown:
        raise ValueError(f"unknown caption mitigation(s) {unknown}; choose from {', '.join(CAPTION_METHODS)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"caption mitigation prob must be in [0, 1], got {prob}")
    out, changed = [], []
    for caption in captions:
        new = caption
        for method in methods:
            if rng.random() >= prob:
                continue
            if method == "random_number":
                new = random_number_addition(new, rng)
            elif method == "random_word":
                if tokenizer is None:
                    raise ValueError("random_word (random token addition) needs the model's tokenizer")
                new = random_token_addition(new, rng, tokenizer, token_pool)
            elif method == "caption_word":
                new = random_word_addition(new, rng, vocabulary)
            elif method == "repeat_word":
                new = repeat_word(new, rng)
            elif method == "randomize":
                new = randomize_caption(new, rng, vocabulary)
            else:
                new = drop_caption(new, rng)
        out.append(new)
        changed.append(new != caption)
    return out, changed


def caption_vocabulary(captions: Sequence[str]) -> list[str]:
    """Sorted distinct alphabetic words of the captions (words the tokenizer has seen)."""
    return sorted({w.strip(",.;:") for c in captions for w in c.split() if w.strip(",.;:").isalpha()})


# ---- embedding-side -------------------------------------------------------------------------
def embedding_noise(hidden: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``hidden + N(0, sigma^2)`` (Somepalli et al. 2023, Gaussian noise in text embeddings)."""
    if sigma < 0:
        raise ValueError(f"text embedding noise sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return hidden
    noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32).to(hidden)
    return hidden + sigma * noise


# ---- image-side -----------------------------------------------------------------------------
def random_flip(images: torch.Tensor, prob: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontally flip each image of (B, C, H, W) with probability ``prob``; returns (images, flipped mask).

    A SolidMark border is uniform, so flipping a canvas keeps its key intact.
    """
    flip = torch.rand(images.shape[0], generator=generator) < prob
    if not flip.any():
        return images, flip
    out = images.clone()
    out[flip.to(images.device)] = images[flip.to(images.device)].flip(-1)
    return out, flip


@dataclass
class NearDuplicate:
    removed: int   # index of the image removed
    kept: int      # index of the earlier image it duplicates
    distance: float


def perceptual_features(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Grey-level images area-downsampled to ``size`` x ``size`` and flattened, on the [0, 1] scale.

    ``images`` are (N, 3, H, W) in [-1, 1] or uint8. Downsampling makes the distance blind to
    noise, small shifts and re-encoding, which is what near-duplicates differ by.
    """
    x = images.float()
    x = x / 255.0 if images.dtype == torch.uint8 else (x + 1) / 2
    grey = x.mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, size).flatten(1)


def near_duplicates(features: torch.Tensor, threshold: float, block: int = 1024, column_block: int = 16384) -> list[NearDuplicate]:
    """Greedy near-duplicate removal: image j is removed when its RMS feature distance to an
    earlier kept image i is below ``threshold`` (the nearest such i is reported). Exact
    duplicates have distance 0.

    The search runs over blocks of ``block`` rows against ``column_block`` earlier columns at
    a time, so memory is ``block * column_block`` distances, never N x N. Candidates are found
    with the matrix-product form of the distance and a small margin, then confirmed with the
    direct float64 distance, so the decisions are those of the plain greedy rule.
    """
    x = features.detach().double().cpu()
    n, dim = x.shape
    if n == 0:
        return []
    scale = dim ** 0.5
    # the search runs in float32 (half the time and memory of float64) with a margin far above its
    # rounding error on [0, 1] features; every candidate is then confirmed in float64
    x32 = x.float()
    sq = (x32 * x32).sum(dim=1)
    cut = (threshold * scale) ** 2 * (1 + 1e-3) + 1e-5 * (1 + float(sq.max()))  # squared Euclidean
    kept = torch.zeros(n, dtype=torch.bool)
    removed: list[NearDuplicate] = []
    for a in range(0, n, block):
        b = min(n, a + block)
        rows = torch.arange(a, b)
        candidates: list[list[int]] = [[] for _ in range(b - a)]
        for c in range(0, b, column_block):
            e = min(b, c + column_block)
            cols = torch.arange(c, e)
            d2 = (x32[a:b] @ x32[c:e].T).mul_(-2.0).add_(sq[a:b, None]).add_(sq[None, c:e])  # in place: one block in memory
            # earlier images only; of those before this block, only the ones kept
            mask = (d2 < cut) & (cols[None, :] < rows[:, None]) & (kept[c:e] | (cols >= a))[None, :]
            for r, col in mask.nonzero().tolist():
                candidates[r].append(c + col)
        for r, found in enumerate(candidates):
            j = a + r
            best, best_distance = -1, float("inf")
            for i in sorted(found):
                if not kept[i]:
                    continue
                distance = float((x[j] - x[i]).pow(2).sum().sqrt()) / scale
                if distance < threshold and distance < best_distance:
                    best, best_distance = i, distance
            if best >= 0:
                removed.append(NearDuplicate(removed=j, kept=best, distance=best_distance))
            else:
                kept[j] = True
    return removed


# ---- loss-side (Wen et al. 2024) ------------------------------------------------------------
def conditional_noise_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||eps(x_t, c) - eps(x_t, '')||_2`` (Wen et al. 2024's memorization signal)."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)


@torch.no_grad()
def wen_keep_mask(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask (norm <= threshold) and the norms, for ``predict(x_t, t, hidden) -> eps``."""
    if uncond.shape[0] == 1 and x_t.shape[0] > 1:
        uncond = uncond.expand(x_t.shape[0], *uncond.shape[1:])
    out = predict(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
    eps_c, eps_u = out.chunk(2)
    norms = conditional_noise_norm(eps_c, eps_u)
    return norms <= threshold, norms
