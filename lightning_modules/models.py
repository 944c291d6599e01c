"""Build the diffusers components of a tiny text-to-image model, or load a local one.

From scratch: a CLIP-style BPE tokenizer learned from the dataset's captions, a tiny
CLIPTextModel, an AutoencoderKL (trained by the autoencoder stage) and a
UNet2DConditionModel. Fine-tuning loads a local diffusers directory instead
(:func:`eidetic.pipelines.load_components`); nothing is ever downloaded.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from eidetic.io import write_text_atomic
from eidetic.pipelines import TextStack

__all__ = ["learn_bpe", "build_tokenizer", "build_text_stack", "build_unet", "build_vae", "build_scheduler"]

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def _bytes_to_unicode() -> dict[int, str]:
    # Same byte->printable-char table as GPT-2/CLIP, so our vocab reads like theirs.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(captions: Sequence[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn CLIP-format BPE merges from ``captions`` until the vocab has ``vocab_size`` entries."""
    import re

    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    word_counts = collections.Counter()
    for caption in captions:
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", caption.lower()):
            symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
            word_counts[symbols] += 1
    merges: list[tuple[str, str]] = []
    budget = max(0, vocab_size - len(vocab) - len(SPECIAL))
    words = dict(word_counts)
    while len(merges) < budget:
        pairs = collections.Counter()
        for symbols, count in words.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        vocab.append(a + b)
        new_words = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + count
        words = new_words
    vocab += SPECIAL
    return {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}, merges


def build_tokenizer(captions: Sequence[str], vocab_size: int, max_length: int, directory: str | Path):
    """Write vocab.json/merges.txt learned from ``captions`` to ``directory`` and load a CLIPTokenizer."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = learn_bpe(captions, vocab_size)
    write_text_atomic(directory / "vocab.json", json.dumps(vocab))
    write_text_atomic(directory / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


def build_text_stack(captions: Sequence[str], cfg: DictConfig, tokenizer_dir: str | Path) -> TextStack:
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(captions, cfg.vocab_size, cfg.max_length, tokenizer_dir)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return TextStack(tokenizer, CLIPTextModel(config))


def build_vae(cfg: DictConfig, canvas: int):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    factor = 2 ** (n - 1)
    if canvas % factor:
        raise ValueError(
            f"canvas size {canvas} (resolution + 2*border) is not divisible by the autoencoder's "
            f"downsampling factor {factor}; change data.resolution/data.border or model.vae.block_out_channels"
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(8, cfg.block_out_channels[0]),
        sample_size=canvas,
    )


def build_unet(cfg: DictConfig, sample_size: int, channels: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    factor = 2 ** (n - 1)
    if sample_size % factor:
        raise ValueError(
            f"the UNet's input ({sample_size}px) is not divisible by its downsampling factor {factor}; "
            "use fewer model.unet.block_out_channels or another resolution/border"
        )
    # "mid": (cross-)attention only in the middle block, at the coarsest resolution: on small
    # canvases attention over every pixel of the outer levels is most of a step's cost
    outer = cfg.attention == "all"
    down = ("CrossAttnDownBlock2D" if outer else "DownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D" if outer else "UpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_scheduler(cfg: DictConfig, prediction_type: str, latent: bool):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=prediction_type,
        clip_sample=not latent,
    )
