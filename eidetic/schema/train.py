"""The training tool's schema (``train.py``): every key a training config may set.

The embedded default job is these defaults: the built-in photographs, a tiny latent diffusion
model trained from scratch on the CPU, W&B offline. Print the resolved config of any command
with ``--print-config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from eidetic.config import Section, choice_problem

from .common import LoggingSettings, RunSettings

__all__ = [
    "TrainConfig", "DataSettings", "DuplicateSettings", "ModelSettings", "SchedulerSettings", "VAESettings",
    "UNetSettings", "TextSettings", "TrainSettings", "EMASettings", "CheckpointSettings", "TrainerSettings",
    "ValidationSettings", "ExtractionSettings", "EdgeSettings", "WenProbeSettings", "CliqueSettings",
    "VerifySettings", "ConfidenceSettings", "AnisotropySettings", "RealismSettings", "RealismLossSettings", "SolidMarkSettings", "MitigationSettings",
    "CaptionMitigation", "InferenceMitigationSettings", "DelayedGuidanceSettings", "WenAdjustSettings", "NearDedupSettings", "AugmentSettings", "WenFilterSettings", "ControlsSettings",
    "StopSettings", "FlaggedSettings", "LoRASettings", "SAMPLERS", "OPTIMIZERS",
]

SAMPLERS = ("ddim", "ddpm")
OPTIMIZERS = ("adamw", "adamw_8bit")


def _positive(section: object, *names: str) -> list[str]:
    return [f"{n} must be >= 1, got {getattr(section, n)}" for n in names if getattr(section, n) < 1]


def _non_negative(section: object, *names: str) -> list[str]:
    return [f"{n} must be >= 0, got {getattr(section, n)}" for n in names if getattr(section, n) < 0]


def _above_zero(section: object, *names: str, nullable: bool = False) -> list[str]:
    """Settings that must be > 0 (``nullable``: or null, which is not checked)."""
    allowed = " or null" if nullable else ""
    return [f"{n} must be > 0{allowed}, got {getattr(section, n)}" for n in names
            if getattr(section, n) is not None and getattr(section, n) <= 0]


# ---- data -------------------------------------------------------------------------------------
# The default job's positive control: 4 of its 56 training crops seen 32 times as often as the
# rest, enough for the monitors to find them within its budget while the singles stay unmemorized.
POSITIVE_CONTROL_LADDER = [[4, 32]]


def duplication_ladder(data) -> list[list[int]]:
    """The rungs ``data.duplicate.ladder`` asks for, its null default resolved by the source."""
    ladder = data.duplicate.ladder
    if ladder is None:
        return [list(r) for r in POSITIVE_CONTROL_LADDER] if data.source == "builtin" else []
    return [[int(count), int(copies)] for count, copies in ladder]


@dataclass
class DuplicateSettings(Section):
    ids: list[str] = field(default_factory=list)  # image ids to repeat
    fraction: float = 0.0  # or a random fraction of the training images
    copies: int = 1  # total copies of each duplicated image (k)
    own_keys: bool = False  # give every copy its own key (the paper's duplication study)
    # rungs of [images, copies]: e.g. [[25, 4], [25, 16], [25, 64]] repeats 25 random training
    # images 4 times, 25 others 16 times, ... (the selective-memorization benchmark's ladder).
    # null (the default): POSITIVE_CONTROL_LADDER on the built-in photographs, so the default
    # job's monitors have something to find; nothing repeated on tiles or your own folder.
    # [] repeats nothing anywhere.
    ladder: Optional[list[list[int]]] = None

    def problems(self) -> list[str]:
        out = _positive(self, "copies")
        out += [f"ladder rungs must be [images >= 1, copies >= 1], got {rung}" for rung in (self.ladder or []) if len(rung) != 2 or min(rung) < 1]
        if not 0 <= self.fraction <= 1:
            out.append(f"fraction must be in [0, 1], got {self.fraction}")
        return out


@dataclass
class DataSettings(Section):
    # builtin (random crops of the scikit-image photographs) | tiles (distinct non-overlapping tiles) | folder |
    # stream (data.folder or data.shards decoded in DataLoader workers as training reads them; keys,
    # split and duplication from each image's id: for sets too large to hold in memory)
    source: str = "builtin"
    folder: Optional[str] = None  # image folder (optional metadata.jsonl with file_name/text)
    shards: Optional[str] = None  # stream: Parquet shards (a .parquet file, a directory of them, or a glob)
    resolution: int = 32  # interior size; the canvas is resolution + 2 * border
    border: int = 4  # SolidMark border thickness in pixels (16 px at 256 px in the paper)
    num_images: int = 64  # builtin: how many crops to cut
    tile_scale: int = 2  # tiles: each tile covers resolution * tile_scale photograph pixels
    shared_caption_fraction: float = 0.25  # builtin: fraction of crops captioned with a shared phrase
    instance_prompt: Optional[str] = None  # every image gets this caption (DreamBooth's, e.g. "a photo of sks object")
    small_images: str = "error"  # images smaller than the resolution: error | upscale | skip
    bad_files: str = "error"  # unreadable image files: error | skip (both list them)
    dedup: bool = True  # drop exact (pixel-identical) duplicates before keying
    heldout_fraction: float = 0.125  # bordered and keyed, never trained on: the baseline split
    key_seed: int = 0
    duplicate: DuplicateSettings = field(default_factory=DuplicateSettings)
    batch_size: int = 16
    num_workers: int = 0
    # encode each bordered training canvas once (both flips under flip augmentation) into
    # latent_cache/ in the run directory; the UNet then trains on cached posterior samples
    cache_latents: bool = False

    def problems(self) -> list[str]:
        out = choice_problem("source", self.source, ("builtin", "tiles", "folder", "stream"))
        out += choice_problem("small_images", self.small_images, ("error", "upscale", "skip"))
        out += choice_problem("bad_files", self.bad_files, ("error", "skip"))
        if self.source == "folder" and not self.folder:
            out.append("source=folder needs folder=PATH (data.folder)")
        if self.source == "stream" and bool(self.folder) == bool(self.shards):
            out.append("source=stream needs exactly one of folder=PATH (an image folder) and shards=PATH (Parquet files)")
        if self.shards and self.source != "stream":
            out.append(f"shards is read by source=stream only (source is {self.source})")
        if self.source == "stream" and self.cache_latents:
            out.append("cache_latents encodes the whole set up front; it does not apply to source=stream")
        if self.resolution < 8:
            out.append(f"resolution must be >= 8, got {self.resolution}")
        out += _positive(self, "border", "num_images", "batch_size", "tile_scale")
        out += _non_negative(self, "num_workers")
        if not 0 <= self.heldout_fraction < 1:
            out.append(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0 <= self.shared_caption_fraction <= 1:
            out.append(f"shared_caption_fraction must be in [0, 1], got {self.shared_caption_fraction}")
        return out


# ---- model ------------------------------------------------------------------------------------
@dataclass
class SchedulerSettings(Section):
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2 (diffusers' names)
    beta_start: float = 0.0001
    beta_end: float = 0.02

    def problems(self) -> list[str]:
        out = choice_problem("beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        out += _positive(self, "num_train_timesteps")
        if not 0 < self.beta_start < self.beta_end < 1:
            out.append(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        return out


@dataclass
class VAESettings(Section):
    pretrained: Optional[str] = None  # local AutoencoderKL directory (or a pipeline dir with vae/)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    train_steps: int = 300
    lr: float = 0.001
    kl_weight: float = 1.0e-06

    def problems(self) -> list[str]:
        out = _positive(self, "layers_per_block", "latent_channels")
        out += _non_negative(self, "train_steps")
        if not self.block_out_channels:
            out.append("block_out_channels must list at least one width")
        return out + _above_zero(self, "lr")


@dataclass
class UNetSettings(Section):
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    # mid: cross-attention only in the middle block, at the coarsest level | all: at every level but the
    # coarsest (diffusers' layout). mid is the default: on the CPU attention over every pixel of the outer
    # levels is most of a step (the default UNet's step costs 2.9x with all), so the default job's
    # duplicated images get the training they need to be memorized within its time budget
    attention: str = "mid"

    def problems(self) -> list[str]:
        out = _positive(self, "layers_per_block", "attention_head_dim", "norm_num_groups")
        out += choice_problem("attention", self.attention, ("all", "mid"))
        if len(self.block_out_channels) < 2:
            out.append(f"block_out_channels needs at least two widths (one down/up level), got {list(self.block_out_channels)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            out.append(f"every width in block_out_channels must be divisible by norm_num_groups={self.norm_num_groups}, got {bad}")
        return out


@dataclass
class TextSettings(Section):
    hidden_size: int = 32
    layers: int = 2
    heads: int = 2
    max_length: int = 24
    vocab_size: int = 1000  # 512 byte-level symbols + learned merges
    train: bool = True  # train the text encoder with the UNet (from scratch only)

    def problems(self) -> list[str]:
        out = _positive(self, "hidden_size", "layers", "heads", "max_length")
        if self.hidden_size % self.heads:
            out.append(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        if self.vocab_size < 514:
            out.append(f"vocab_size must be >= 514 (512 byte symbols + 2 special tokens), got {self.vocab_size}")
        return out


@dataclass
class LoRASettings(Section):
    """Low-rank adapters (peft, as diffusers' own LoRA scripts use them) on a ``model.pretrained``
    base: only the adapters train; the base weights stay frozen and unchanged."""

    enabled: bool = False
    rank: int = 4
    alpha: float = 4.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0
    # UNet modules that get adapters (peft matches a module name or its dotted suffix): the attention projections
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: bool = False  # also adapt the text encoder's attention projections
    text_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    export_merged: bool = False  # also write model/: a full pipeline with the adapters merged into the base

    def problems(self) -> list[str]:
        out = _positive(self, "rank") + _above_zero(self, "alpha")
        if not 0 <= self.dropout < 1:
            out.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            out.append("target_modules is empty: name at least one UNet module (e.g. to_q)")
        if self.enabled and self.text_encoder and not self.text_target_modules:
            out.append("text_target_modules is empty: name at least one text-encoder module (e.g. q_proj)")
        return out


@dataclass
class ModelSettings(Section):
    pretrained: Optional[str] = None  # local diffusers Stable Diffusion-style directory to fine-tune
    space: str = "latent"  # latent | pixel
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    vae: VAESettings = field(default_factory=VAESettings)
    unet: UNetSettings = field(default_factory=UNetSettings)
    text: TextSettings = field(default_factory=TextSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)

    def problems(self) -> list[str]:
        out = choice_problem("space", self.space, ("latent", "pixel")) + choice_problem(
            "prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample")
        )
        if self.lora.enabled and not self.pretrained:
            out.append("lora.enabled needs a base model to adapt: set model.pretrained=DIR (a local diffusers directory)")
        return out


# ---- training ---------------------------------------------------------------------------------
@dataclass
class EMASettings(Section):
    enabled: bool = True
    decay: float = 0.999
    warmup: bool = True  # decay ramps as min(decay, (1 + n) / (10 + n))

    def problems(self) -> list[str]:
        return [] if 0 <= self.decay < 1 else [f"decay must be in [0, 1), got {self.decay}"]


@dataclass
class CheckpointSettings(Section):
    every_n_steps: int = 500
    keep: int = 2  # newest step checkpoints kept (last.ckpt always kept)

    def problems(self) -> list[str]:
        return _non_negative(self, "every_n_steps") + _positive(self, "keep")


@dataclass
class TrainSettings(Section):
    max_steps: int = 1600
    max_epochs: Optional[int] = None
    lr: float = 0.001
    weight_decay: float = 0.01
    lr_warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant | cosine
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0: no clipping
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    caption_dropout: float = 0.1  # for classifier-free guidance
    min_snr_gamma: Optional[float] = None  # e.g. 5.0 (Hang et al. 2023)
    noise_offset: float = 0.0  # e.g. 0.05
    resume: Optional[str] = None  # "last" or a checkpoint path (needs run.dir of the run)
    optimizer: str = "adamw"  # adamw | adamw_8bit (bitsandbytes, CUDA only)
    gradient_checkpointing: bool = False  # recompute UNet (and trained text encoder) activations in backward
    compile: bool = False  # torch.compile the UNet (in place: checkpoint keys do not change)
    ema: EMASettings = field(default_factory=EMASettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)

    def problems(self) -> list[str]:
        out = choice_problem("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        out += choice_problem("optimizer", self.optimizer, OPTIMIZERS)
        out += choice_problem("precision", self.precision, ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"))
        out += _positive(self, "grad_accum") + _non_negative(self, "lr_warmup_steps", "weight_decay", "grad_clip", "noise_offset")
        if self.max_steps < 1 and self.max_epochs is None:
            out.append(f"max_steps must be >= 1 (or set max_epochs), got {self.max_steps}")
        out += _above_zero(self, "lr")
        if not 0 <= self.caption_dropout <= 1:
            out.append(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        out += _above_zero(self, "min_snr_gamma", nullable=True)
        return out


@dataclass
class TrainerSettings(Section):
    """Passed to ``lightning.pytorch.Trainer`` as it is (keyword for keyword)."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    log_every_n_steps: int = 10
    deterministic: bool = False
    fast_dev_run: bool = False
    enable_progress_bar: bool = True
    limit_val_batches: float = 0

    def problems(self) -> list[str]:
        return _positive(self, "devices", "num_nodes", "log_every_n_steps")


@dataclass
class ValidationSettings(Section):
    every_n_steps: int = 400  # sample grids (0 disables)
    captions: list[str] = field(default_factory=list)  # default: the first 4 training captions
    steps: int = 25
    guidance: float = 3.0
    sampler: str = "ddim"

    def problems(self) -> list[str]:
        return choice_problem("sampler", self.sampler, SAMPLERS) + _non_negative(self, "every_n_steps") + _positive(self, "steps")


# ---- monitors ---------------------------------------------------------------------------------
@dataclass
class ConfidenceSettings(Section):
    """Webster's white-box denoising confidence (eidetic.extraction.denoising_confidence)."""

    seeds: int = 8  # noise draws averaged per caption (evaluations per caption)
    reference: str = "noise"  # noise: Webster's formula | unconditional: vs the empty caption (= Wen's first-step norm, squared)

    def problems(self) -> list[str]:
        return _positive(self, "seeds") + choice_problem("reference", self.reference, ("noise", "unconditional"))


@dataclass
class EdgeSettings(Section):
    seeds: int = 4
    threshold: float = 1.5  # Sobel magnitude on [0,1] images, summed over channels (Webster's code)
    guidance: float = 7.5  # the pipeline default Webster's black-box attack ran at
    channel_smoothing: bool = True  # scipy.ndimage.sobel on (H, W, 3) arrays also smooths across channels (4x a per-channel Sobel)
    resize: Optional[int] = None  # Webster resizes SD's 512 px images to 256; null: analyse at the images' own size

    def problems(self) -> list[str]:
        return _positive(self, "seeds")


@dataclass
class AnisotropySettings(Section):
    """Asthana & Belagiannis (ICLR 2026): norm and alignment of the guidance direction."""

    steps: int = 50  # DDIM schedule the high- and low-noise timesteps come from
    low_step: int = -3  # the cosine's timestep: the third from last
    gamma_norm: float = 1.0  # SD1 weights of the reference code
    gamma_cosine: float = 2.0
    norm_scale: str = "none"  # none (faithful) | sd1_latent (rescale the norm to SD1's latent size first)

    def problems(self) -> list[str]:
        return _positive(self, "steps") + choice_problem("norm_scale", self.norm_scale, ("none", "sd1_latent"))


@dataclass
class WenProbeSettings(Section):
    steps: int = 50  # DDIM schedule the first steps are taken from
    first_steps: int = 1  # evaluations per caption and seed (Wen et al.: the first step alone, AUC 0.960 on SD1)
    seeds: int = 1

    def problems(self) -> list[str]:
        out = _positive(self, "steps", "first_steps", "seeds")
        if self.first_steps > self.steps:
            out.append(f"first_steps ({self.first_steps}) cannot exceed steps ({self.steps})")
        return out


@dataclass
class CliqueSettings(Section):
    generations: int = 16  # paper: 500
    steps: int = 25
    threshold: float = 0.15  # tiled RMS on the [0,1] scale
    min_clique: int = 4  # paper: 10 of 500
    tiles: int = 4

    def problems(self) -> list[str]:
        return _positive(self, "generations", "steps", "min_clique", "tiles")


@dataclass
class VerifySettings(Section):
    enabled: bool = True
    generations: int = 1
    steps: int = 50
    sampler: str = "ddim"
    guidance: float = 1.0  # guidance exaggerates a copy's contrast past the L2 threshold
    threshold: float = 0.1  # RMS on the [0,1] scale
    template_mask: str = "border"  # border (SolidMark frame may differ: template copies) | none
    # training images the nearest-neighbour check compares generations with: all of them up to this
    # many; a larger set uses the images of the probed captions plus a seeded sample of the rest
    max_reference: int = 4096

    def problems(self) -> list[str]:
        return (choice_problem("sampler", self.sampler, SAMPLERS) + choice_problem("template_mask", self.template_mask, ("border", "none"))
                + _positive(self, "generations", "steps", "max_reference"))


@dataclass
class ExtractionSettings(Section):
    enabled: bool = True
    every_n_steps: int = 500  # probe every N optimizer steps (0: only at the end)
    at_end: bool = True  # probe once more when training ends
    max_train_captions: int = 256  # seeded sample of distinct training captions (0: all); duplicated ones always kept; held-out captions are sampled to the same number
    heldout: bool = True  # also score held-out captions (the trained-vs-held-out AUC)
    detectors: list[str] = field(default_factory=lambda: ["denoising_confidence", "edge_consistency", "noise_prediction_norm", "anisotropy"])
    guidance: float = 7.5  # classifier-free guidance of the one-step probes (Stable Diffusion's default, the papers')
    # the one-step probes start from pure noise at the largest timestep whose sigma_t = sqrt((1 - abar)/abar)
    # is at most this (null: the largest timestep, Webster's sigma_max; the linear schedule's is ~157)
    sigma: Optional[float] = 14.6
    seed: int = 0
    batch_size: int = 64  # images per UNet call
    top_k: int = 8  # flagged captions verified, tabulated and used for precision_at_k
    confidence: ConfidenceSettings = field(default_factory=ConfidenceSettings)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    wen: WenProbeSettings = field(default_factory=WenProbeSettings)
    anisotropy: AnisotropySettings = field(default_factory=AnisotropySettings)
    clique: CliqueSettings = field(default_factory=CliqueSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)

    def problems(self) -> list[str]:
        from eidetic.extraction import DETECTORS

        out = [p for d in self.detectors for p in choice_problem("detectors", d, tuple(DETECTORS))]
        out += _non_negative(self, "every_n_steps", "max_train_captions", "top_k")
        out += _above_zero(self, "sigma", nullable=True) + _positive(self, "batch_size")
        if self.enabled and not self.detectors:
            out.append("detectors is empty: list at least one, or set extraction.enabled=false")
        return out


@dataclass
class RealismLossSettings(Section):
    weight: float = 0.0  # lambda; > 0 adds lambda * realism_loss(predicted clean image) to the diffusion loss
    t_min: int = 0  # only timesteps t_min <= t <= t_max (x0 predictions at large t are blurry means)
    t_max: int = 400

    def problems(self) -> list[str]:
        out = _non_negative(self, "weight")
        if not 0 <= self.t_min <= self.t_max:
            out.append(f"need 0 <= t_min <= t_max, got {self.t_min}, {self.t_max}")
        return out


@dataclass
class RealismSettings(Section):
    enabled: bool = False  # add RealismCallback to the run
    every_n_steps: int = 500  # IRS of generated samples every N steps (0: only at the end)
    num_samples: int = 32  # seeded samples per evaluation, captions cycled from the training set
    steps: int = 25  # sampler steps per sample
    guidance: float = 3.0
    sampler: str = "ddim"  # ddim | ddpm
    reference: str = "train"  # train (fit on training interiors) | builtin (skimage photographs) | path to irs_reference.json
    max_real: int = 256  # training interiors scored for irs_{paper,two_sided}_real_mean (and fitted on, for reference=train)
    loss: RealismLossSettings = field(default_factory=RealismLossSettings)

    def problems(self) -> list[str]:
        return choice_problem("sampler", self.sampler, SAMPLERS) + _positive(self, "num_samples", "steps", "max_real") + _non_negative(self, "every_n_steps")


@dataclass
class SolidMarkSettings(Section):
    """Scores a fixed sample of trained and held-out images by outpainting their key border
    with the EMA weights; see :mod:`eidetic.solidmark`."""

    enabled: bool = True
    every_n_steps: int = 400  # evaluate every N optimizer steps (0 disables)
    every_n_epochs: int = 0  # and/or every N epochs (0 disables)
    at_train_end: bool = True  # always evaluate once more when training ends
    train_sample: Optional[int] = None  # trained images scored each time (null: all); more than the split has is an error
    heldout_sample: Optional[int] = None  # held-out images scored each time (null: all)
    # a null sample size scores every image of a split up to this many; a larger split (a streamed
    # set) is sampled to this size, stratified by copy count, and only the sample is ever decoded
    max_sample: int = 1024
    sample_seed: int = 0  # which images form the fixed sample
    ema: bool = True  # score the EMA weights (false: the raw weights)
    steps: int = 25  # outpainting steps (paper: 250 ancestral DDPM in pixel space, 100 for SD); cost ~ images x steps
    # classifier-free guidance (paper: 3). 1 = none: with the exact (oracle) denoiser guidance 3
    # loses 10-30 % of memorized keys by overshoot, and it doubles the cost
    guidance: float = 1.0
    sampler: str = "ddpm"  # ddpm (ancestral; the paper's) | ddim
    # latent models: decode/paste interior/re-encode every N steps (the last step always). 1 (every step)
    # makes a memorized image's outpaintings agree with each other; at 5 the frame wanders between the
    # re-encodes and the default job's duplicated images are found in fewer runs (README, positive control)
    reencode_every: int = 1
    resample_jump: int = 0  # RePaint resampling: every N steps jump back N steps (0: off; RePaint's own: 10)
    resample_count: int = 1  # ... and denoise again, this many times in all (RePaint's own: 10)
    # how the known interior conditions the frame (pixel models): "guided" (default, a deviation
    # from the paper) = replacement plus reconstruction guidance from the clean interior;
    # "replace" = the paper's plain RePaint-style replacement. With a caption that does not
    # identify the image (unconditional, or shared as in DreamBooth) replacement lets a perfect
    # memorizer lose keys: on the empirical optimal denoiser (16 tiles, 4 px border) 9-13 of 16
    # unconditional and 13-16 shared vs 13-16 and 16 guided (benchmarks/oracle_outpainting.py).
    # Guided costs one backward pass per step. Latent models replace: guidance through the decoder
    # (outpaint_border supports it) measured no better on a latent oracle and costs decoder backward passes.
    conditioning: str = "guided"
    reconstruction_weight: float = 4.0  # "guided": the guidance weight w (1: p(interior | x_t) with variance 1 - abar_t)
    known_noise: str = "fresh"  # interior noise at each replacement: fresh (paper, RePaint) | fixed (one trajectory)
    samples_per_image: int = 1  # outpaintings averaged per image
    batch_size: int = 64
    seed: int = 0  # outpainting noise, the same at every evaluation
    deltas: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.005])
    # an image is flagged (for controls) when its per-image p-value survives Benjamini-Hochberg
    # at this false-discovery rate across the sample: a single ℓ < δ is not evidence (~2δ of
    # unmemorized images land there by chance)
    flag_q: float = 0.1
    table_rows: int = 16  # most-memorized images in the W&B table and the grid
    log_images: bool = True

    def outpaint_options(self, latent: bool) -> dict:
        """The keyword arguments of :func:`eidetic.solidmark.outpaint_border` these settings ask for."""
        guided = self.conditioning == "guided" and not latent
        return dict(steps=self.steps, guidance=self.guidance, sampler=self.sampler, reencode_every=self.reencode_every,
                    samples_per_image=self.samples_per_image, seed=self.seed, batch_size=self.batch_size,
                    resample_jump=self.resample_jump, resample_count=self.resample_count, known_noise=self.known_noise,
                    reconstruction_guidance=self.reconstruction_weight if guided else 0.0)

    def problems(self) -> list[str]:
        out = choice_problem("sampler", self.sampler, SAMPLERS)
        out += _non_negative(self, "every_n_steps", "every_n_epochs", "table_rows")
        out += _positive(self, "steps", "reencode_every", "samples_per_image", "batch_size", "resample_count", "max_sample")
        out += _non_negative(self, "resample_jump")
        out += choice_problem("conditioning", self.conditioning, ("guided", "replace"))
        out += choice_problem("known_noise", self.known_noise, ("fresh", "fixed"))
        if self.reconstruction_weight <= 0:
            out.append(f"reconstruction_weight must be > 0 (use conditioning=replace for none), got {self.reconstruction_weight}")
        for name in ("train_sample", "heldout_sample"):
            value = getattr(self, name)
            if value is not None and value < 0:
                out.append(f"{name} must be >= 0 or null (all), got {value}")
        if not self.deltas:
            out.append("deltas needs at least one threshold, e.g. [0.1, 0.05, 0.005]")
        out += [f"deltas must lie in (0, 1) (key scale), got {d}" for d in self.deltas if not 0 < d < 1]
        if not 0 < self.flag_q < 1:
            out.append(f"flag_q must be in (0, 1), got {self.flag_q}")
        return out


# ---- mitigations and controls -----------------------------------------------------------------
@dataclass
class CaptionMitigation(Section):
    # composable, in order (Somepalli et al. 2023): random_number | random_word (a random token id of the
    # tokenizer's vocabulary, as their code) | caption_word (a random word of the captions; not theirs) |
    # repeat_word | randomize | dropout
    methods: list[str] = field(default_factory=list)
    prob: float = 0.1  # per caption and method

    def problems(self) -> list[str]:
        from eidetic.mitigations import CAPTION_METHODS

        out = [p for m in self.methods for p in choice_problem("methods", m, CAPTION_METHODS)]
        if not 0 <= self.prob <= 1:
            out.append(f"prob must be in [0, 1], got {self.prob}")
        return out


@dataclass
class NearDedupSettings(Section):
    enabled: bool = False  # perceptual near-duplicate removal; removed images listed in near_duplicates_removed.txt
    threshold: float = 0.02  # RMS distance of 8x8 grey-level thumbnails on the [0, 1] scale
    size: int = 8
    collapse_copies: bool = True  # also train duplicated images (data.duplicate) once: they are exact duplicates

    def problems(self) -> list[str]:
        return _positive(self, "size") + _non_negative(self, "threshold")


@dataclass
class AugmentSettings(Section):
    flip: float = 0.0  # probability of a horizontal flip per training image

    def problems(self) -> list[str]:
        return [] if 0 <= self.flip <= 1 else [f"flip must be in [0, 1], got {self.flip}"]


@dataclass
class WenFilterSettings(Section):
    enabled: bool = False  # skip samples with ||eps(x_t,c) - eps(x_t,'')|| > threshold (Wen et al. 2024)
    threshold: float = 1.0
    warmup_steps: int = 0  # filter only after this many optimizer steps

    def problems(self) -> list[str]:
        return _non_negative(self, "warmup_steps")


@dataclass
class MitigationSettings(Section):
    caption: CaptionMitigation = field(default_factory=CaptionMitigation)
    text_noise_sigma: float = 0.0  # Gaussian noise on text embeddings (Somepalli et al. 2023 GNI); 0 disables
    near_dedup: NearDedupSettings = field(default_factory=NearDedupSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    wen: WenFilterSettings = field(default_factory=WenFilterSettings)

    def problems(self) -> list[str]:
        return _non_negative(self, "text_noise_sigma")


@dataclass
class DelayedGuidanceSettings(Section):
    """Jain et al. (CVPR 2025), static transition point: classifier-free guidance only from
    ``transition`` on (t <= transition); before it the scale is ``guidance_before``."""

    enabled: bool = False
    transition: int = 500  # their static default (of 1000 training timesteps); >= 999: no delay; -1: never guided
    guidance_before: float = 0.0  # their code: 0 = the unconditional prediction; < 0: "opposite guidance" (their -2)

    def problems(self) -> list[str]:
        return [] if self.transition >= -1 else [f"transition must be >= -1, got {self.transition}"]


@dataclass
class WenAdjustSettings(Section):
    """Wen et al. (ICLR 2024) inference-time mitigation: AdamW steps on the prompt embedding that
    lower ||eps(x_T, c) - eps(x_T, '')|| at the first sampling step, before sampling."""

    enabled: bool = False
    steps: int = 10  # their optim_iters
    lr: float = 0.05  # their optim_lr
    target_loss: Optional[float] = 3.0  # stop once the norm is at most this (their README: 3, on SD v1 latents); null: always all steps

    def problems(self) -> list[str]:
        return _positive(self, "steps") + _above_zero(self, "lr") + _above_zero(self, "target_loss", nullable=True)


@dataclass
class InferenceMitigationSettings(Section):
    """Mitigations applied at query time, wherever the model generates (SolidMark outpainting,
    extraction probes, validation and realism samples, the comparison's quality samples); see
    :mod:`eidetic.inference_mitigations`. The defaults change nothing."""

    # caption changes, in order: random_number | random_token | repeat_word (SolidMark's RNA, RWA, CWR)
    captions: list[str] = field(default_factory=list)
    count: int = 2  # words inserted per change (their repeat_num; SolidMark's default 2, Wen et al.'s RWA baseline 4)
    number_high: int = 100000  # random_number draws integers in [0, number_high)
    text_noise_sigma: float = 0.0  # Gaussian noise on the conditional text embedding (SolidMark: strength / 10)
    delayed_guidance: DelayedGuidanceSettings = field(default_factory=DelayedGuidanceSettings)
    wen: WenAdjustSettings = field(default_factory=WenAdjustSettings)
    seed: int = 0  # every draw is a function of (seed, caption)

    def problems(self) -> list[str]:
        from eidetic.inference_mitigations import CAPTION_CHANGES

        out = [p for m in self.captions for p in choice_problem("captions", m, CAPTION_CHANGES)]
        out += _positive(self, "count", "number_high") + _non_negative(self, "text_noise_sigma")
        return out


@dataclass
class StopSettings(Section):
    margin: Optional[float] = None  # stop when eidetic - chance > margin (null: off)
    p_value: Optional[float] = None  # stop when the SolidMark p-value < this bound (null: off)
    min_step: int = 0  # never stop before this step
    mode: str = "stop"  # stop: end training | keep: train on, checkpoints/under_budget.ckpt keeps the newest state under the budget

    def problems(self) -> list[str]:
        return choice_problem("mode", self.mode, ("stop", "keep")) + _non_negative(self, "min_step")


@dataclass
class FlaggedSettings(Section):
    action: str = "none"  # none | exclude | downweight: images flagged by SolidMark / extraction
    weight: float = 0.1  # loss weight of flagged images (downweight)
    sources: list[str] = field(default_factory=lambda: ["solidmark", "extraction"])  # monitors whose flags count

    def problems(self) -> list[str]:
        out = choice_problem("action", self.action, ("none", "exclude", "downweight"))
        if not 0 <= self.weight <= 1:
            out.append(f"weight must be in [0, 1], got {self.weight}")
        return out


@dataclass
class ControlsSettings(Section):
    enabled: bool = False  # MemorizationControlCallback: act on the monitors' results
    delta: float = 0.05  # SolidMark delta (one of solidmark.deltas) whose counts are read
    stop: StopSettings = field(default_factory=StopSettings)
    flagged: FlaggedSettings = field(default_factory=FlaggedSettings)


# ---- the whole config -------------------------------------------------------------------------
@dataclass
class TrainConfig(Section):
    seed: int = 0
    run: RunSettings = field(default_factory=RunSettings)
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    realism: RealismSettings = field(default_factory=RealismSettings)
    solidmark: SolidMarkSettings = field(default_factory=SolidMarkSettings)
    mitigation: MitigationSettings = field(default_factory=MitigationSettings)
    inference_mitigation: InferenceMitigationSettings = field(default_factory=InferenceMitigationSettings)
    controls: ControlsSettings = field(default_factory=ControlsSettings)

    def problems(self) -> list[str]:
        out = []
        if self.controls.enabled and self.solidmark.enabled and self.controls.delta not in self.solidmark.deltas:
            out.append(f"controls.delta={self.controls.delta} is not one of solidmark.deltas {list(self.solidmark.deltas)}")
        if self.data.cache_latents and self.model.space != "latent":
            out.append("data.cache_latents needs a latent model (model.space=latent): pixel models have no autoencoder to cache")
        return out
