"""The imitation audit's schema (``imitate.py``): how much does one before/after example leak of
an image-to-image model (Spingarn & Michaeli 2024)?

    python imitate.py teacher=gaussian_blur example=astronaut
    python imitate.py teacher=classical example_sizes=[64,128,256]
    python imitate.py input=before.png output=after.png [teacher=mypkg.ops:fn]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from eidetic.config import Section, choice_problem

from .common import LoggingSettings, RunSettings

__all__ = ["ImitateConfig", "TeacherSettings", "StudentSettings", "ImitationTrainSettings", "ImitationEvalSettings", "ImitationTrainerSettings"]


@dataclass
class GaussianBlurTeacher(Section):
    sigma: float = 2.0


@dataclass
class UnsharpMaskTeacher(Section):
    radius: float = 2.0
    amount: float = 1.0


@dataclass
class TVDenoiseTeacher(Section):
    weight: float = 0.2


@dataclass
class BicubicSRTeacher(Section):
    scale: int = 2


@dataclass
class WaveletDenoiseTeacher(Section):
    sigma: float = 0.05  # noise std of its inputs (on [0, 1]), known to the denoiser


@dataclass
class RichardsonLucyTeacher(Section):
    blur_sigma: float = 1.5  # Gaussian PSF std (px) of its inputs' blur, known to the deconvolution
    num_iter: int = 10


@dataclass
class BlindWaveletDenoiseTeacher(Section):
    sigma: float = 0.05  # noise std of the example's input; the denoiser estimates it per input
    heldout_sigmas: list[float] = field(default_factory=lambda: [0.02, 0.1])  # held-out inputs' noise levels


@dataclass
class RandomNoiseControl(Section):
    sigma_min: float = 0.0
    sigma_max: float = 0.1


@dataclass
class DiffusionTeacher(Section):
    """teacher=diffusion: this project's model as an image-to-image map."""

    model_dir: Optional[str] = None  # a run's model/ directory (diffusers layout); required
    timestep: int = 100  # one-step denoising at this fixed timestep
    caption: str = ""  # prompt ("" = unconditional)
    guidance: float = 1.0
    noise: bool = False  # false: no noise (a fixed map); true: fresh noise per image (blind)


@dataclass
class TeacherSettings(Section):
    """Fixed parameters of the built-in teachers."""

    gaussian_blur: GaussianBlurTeacher = field(default_factory=GaussianBlurTeacher)
    unsharp_mask: UnsharpMaskTeacher = field(default_factory=UnsharpMaskTeacher)
    tv_denoise: TVDenoiseTeacher = field(default_factory=TVDenoiseTeacher)
    bicubic_sr: BicubicSRTeacher = field(default_factory=BicubicSRTeacher)
    wavelet_denoise: WaveletDenoiseTeacher = field(default_factory=WaveletDenoiseTeacher)
    richardson_lucy: RichardsonLucyTeacher = field(default_factory=RichardsonLucyTeacher)
    wavelet_denoise_blind: BlindWaveletDenoiseTeacher = field(default_factory=BlindWaveletDenoiseTeacher)
    random_noise_control: RandomNoiseControl = field(default_factory=RandomNoiseControl)
    diffusion: DiffusionTeacher = field(default_factory=DiffusionTeacher)


@dataclass
class StudentSettings(Section):
    arch: str = "cnn"  # cnn (plain conv stack) | unet (small UNet)
    width: int = 32  # channels (UNet: of the first level, doubling per level)
    depth: int = 6  # cnn: conv layers (receptive field 1 + depth*(kernel_size-1)); unet: levels
    kernel_size: int = 3
    blocks_per_level: int = 1  # unet only: convs per level

    def problems(self) -> list[str]:
        out = choice_problem("arch", self.arch, ("cnn", "unet"))
        out += [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("width", "depth", "kernel_size", "blocks_per_level") if getattr(self, k) < 1]
        return out


@dataclass
class ImitationTrainSettings(Section):
    steps: int = 800
    batch_size: int = 16
    crop_size: int = 32  # student-input crop side (the output crop is scale * crop_size)
    loss_margin: int = -1  # crop border excluded from the loss; -1: half the receptive field, capped at crop/4
    lr: float = 0.002
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 40
    weight_decay: float = 0.0

    def problems(self) -> list[str]:
        out = choice_problem("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        out += [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("steps", "batch_size", "crop_size") if getattr(self, k) < 1]
        if self.lr <= 0:
            out.append(f"lr must be > 0, got {self.lr}")
        return out


@dataclass
class ImitationEvalSettings(Section):
    images: list[str] = field(default_factory=lambda: ["astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "moon",
                                                       "brick", "grass", "gravel", "clock", "immunohistochemistry"])
    crop: int = 256  # central crop of each held-out photograph (0: whole image)
    every_n_steps: int = 200  # held-out PSNR curve during training (0: only at the end)
    monitor_images: int = 3  # how many held-out images the curve uses (the final evaluation uses all)

    def problems(self) -> list[str]:
        from eidetic.photos import ALIASES, PHOTOS

        unknown = [n for n in self.images if n not in PHOTOS and n not in ALIASES]
        return [f"images names unknown photographs {unknown}; choose from {', '.join(PHOTOS)}"] if unknown else []


@dataclass
class ImitationTrainerSettings(Section):
    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"
    log_every_n_steps: int = 10
    enable_progress_bar: bool = False


@dataclass
class ImitateConfig(Section):
    seed: int = 0
    run: RunSettings = field(default_factory=lambda: RunSettings(name="imitate"))
    # Which model to imitate: a built-in name (operators on clean photographs: gaussian_blur,
    # unsharp_mask, tv_denoise, bicubic_sr; restoration on degraded inputs: wavelet_denoise,
    # richardson_lucy; blind restoration: wavelet_denoise_blind; negative control:
    # random_noise_control; diffusion), "module:function" (numpy (H,W,3) float in [0,1] -> same
    # layout), a comma-separated list of those, or a group: "classical" (the four operators),
    # "restoration", "blind", "control", "all". Default: gaussian_blur. With input/output files the teacher is not queried for
    # training; if given it is the reference for held-out evaluation.
    teacher: Optional[str] = None
    example: str = "astronaut"  # the teacher's input: a scikit-image photograph name or an image file
    input: Optional[str] = None  # or train from a pair of files: the model's input image ...
    output: Optional[str] = None  # ... and its output (same size, or an integer multiple for super-resolution)
    example_size: int = 0  # central square crop of the example (0: the whole image)
    example_sizes: list[int] = field(default_factory=list)  # size sweep, e.g. [48, 96, 192, 384]: one student per size, plus a plot
    teachers: TeacherSettings = field(default_factory=TeacherSettings)
    student: StudentSettings = field(default_factory=StudentSettings)
    train: ImitationTrainSettings = field(default_factory=ImitationTrainSettings)
    eval: ImitationEvalSettings = field(default_factory=ImitationEvalSettings)
    trainer: ImitationTrainerSettings = field(default_factory=ImitationTrainerSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def problems(self) -> list[str]:
        out = []
        if (self.input is None) != (self.output is None):
            out.append("give both input=<file> and output=<file> (the model's before/after pair), or neither")
        if any(s < 1 for s in self.example_sizes):
            out.append(f"example_sizes must be positive integers, got {list(self.example_sizes)}")
        for size in list(self.example_sizes) + ([self.example_size] if self.example_size > 0 else []):
            if size < self.train.crop_size:
                out.append(f"example size {size} is smaller than the training crop size {self.train.crop_size}: "
                           f"drop it or set train.crop_size <= {size}")
        return out
