"""The protection tool's schema (``protect.py``): protective perturbations against diffusion
mimicry (Xue et al., ICLR 2024)::

    python protect.py input=photos/ model=runs/x/model output=protected/ objective=sds-
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eidetic.config import Section, choice_problem

__all__ = ["ProtectConfig", "EvaluateSettings", "MimicrySettings", "PurificationSettings", "OBJECTIVES", "RANDOM",
           "SEMANTIC_OBJECTIVES", "TEXTURAL_OBJECTIVES", "DTYPES", "PGD_SDST_WEIGHTINGS", "ENCODER_LATENTS"]

# The objectives' names and loss terms live here, free of torch, so that reports and benchmarks
# can name them without loading the models; eidetic/protection.py implements them.
OBJECTIVES = ("advdm+", "advdm-", "photoguard", "mist", "sds+", "sds-", "sdst")
SEMANTIC_OBJECTIVES = ("advdm+", "advdm-", "mist", "sds+", "sds-", "sdst")  # attack the denoiser
TEXTURAL_OBJECTIVES = ("photoguard", "mist", "sdst")  # attack the autoencoder
# The null perturbation: a seeded random sign at every pixel, the budget of a saturated PGD
# perturbation without its objective. A protection's drop means something only above this one's.
RANDOM = "random"

DTYPES = ("float32", "float16", "bfloat16")
PGD_SDST_WEIGHTINGS = ("diff-protect", "textural_weight")
ENCODER_LATENTS = ("sample", "mean")
RANDOM_STARTS = ("auto", "always", "never")


@dataclass
class PurificationSettings(Section):
    """One purification a mimic may apply before SDEdit and fine-tuning (eidetic/purification.py).

    Only the settings of its ``kind`` are read: ``quality`` (jpeg), ``sigma`` (gaussian,
    noisy_upscale), ``factor`` (noisy_upscale), ``t_star`` and ``steps`` (diffpure)."""

    kind: str = "jpeg"  # jpeg | gaussian | noisy_upscale | diffpure
    name: str = ""  # label in the report and summary; "" = kind
    quality: int = 75  # JPEG quality, 1..95
    sigma: float = 0.05  # Gaussian noise standard deviation as a fraction of the [0, 1] pixel range
    factor: int = 2  # noisy_upscale: downscale factor before the noise and the bicubic upscale
    t_star: int = 100  # diffpure: forward-noising timestep (of the model's training timesteps)
    steps: int = 10  # diffpure: DDIM steps from t_star back to 0

    def label(self) -> str:
        return self.name or self.kind

    def problems(self) -> list[str]:
        from eidetic.purification import PURIFICATIONS

        out = choice_problem("kind", self.kind, PURIFICATIONS)
        if not 1 <= self.quality <= 95:
            out.append(f"quality must be an integer in 1..95, got {self.quality}")
        if not 0 <= self.sigma <= 1:
            out.append(f"sigma must be in [0, 1] (a fraction of the pixel range; 8/255 = {8 / 255:.4f}), got {self.sigma}")
        if self.factor < 1:
            out.append(f"factor must be an integer >= 1, got {self.factor}")
        if self.t_star < 0:
            out.append(f"t_star must be a timestep >= 0, got {self.t_star}")
        if self.steps < 1:
            out.append(f"steps must be >= 1, got {self.steps}")
        if "/" in self.label() or not self.label().strip():
            out.append(f"name must be a non-empty label without '/', got {self.label()!r}")
        return out


@dataclass
class EvaluateSettings(Section):
    enabled: bool = True
    max_images: int = 16  # SDEdit is costly: evaluate the first N protected images
    strengths: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    steps: int = 20  # DDIM steps of a full-strength edit (strength s runs round(s * steps))
    guidance: float = 3.0
    semantic_samples: int = 8  # (t, noise) draws for the before/after semantic loss

    def problems(self) -> list[str]:
        out = []
        if any(not 0 < s <= 1 for s in self.strengths):
            out.append(f"strengths must be numbers in (0, 1], got {list(self.strengths)}")
        if self.max_images < 0 or self.steps < 1 or self.semantic_samples < 1:
            out.append("max_images must be >= 0, steps and semantic_samples >= 1")
        return out


@dataclass
class MimicrySettings(Section):
    """Mimicry after fine-tuning (workflows/mimicry.py): fine-tune the model on the clean and on the
    protected copies with the framework's own training, then compare how well each fine-tuned model
    reproduces the clean images from their captions (SSIM/PSNR of the interior inside the SolidMark
    border). The training config is the model's run config (<model>/../config.yaml) or the training
    defaults; monitors, controls, mitigations and the held-out split are off."""

    enabled: bool = False  # trains two models (minutes on CPU for a few small images)
    work_dir: str = ""  # staged images + both run dirs; "" = <output>.mimicry beside output (never inside input/output)
    steps: int = 1500  # optimizer steps of each fine-tune (200 barely moves the default model: README, mimicry)
    lr: float | None = None  # fine-tuning learning rate; null = train.lr of the base training config
    seed: int = 0  # training seed of both fine-tunes and the seed of the sampling noise
    samples_per_image: int = 4  # generations per caption and model; mean and best-of reported
    sampler: str = "ddim"  # ddim | ddpm
    sample_steps: int = 25  # sampler steps per generation
    guidance: float = 3.0  # classifier-free guidance of the generations
    train_overrides: list[str] = field(default_factory=list)  # extra training key=value overrides for both fine-tunes
    # the clean/ run directory of an earlier evaluation of the same images, steps, seed and config:
    # reused instead of fine-tuning on the clean images again (checked to match), so protections
    # of one image set compared side by side share one clean fine-tune; "" = fine-tune it here
    clean_run: str = ""
    # false: fine-tune only on each purification's purified pair, not on the unpurified copies
    # (needs a purification); clean_run then names the clean fine-tune of that one purification
    unpurified: bool = True

    def problems(self) -> list[str]:
        out = [f"{k} must be an integer >= 1, got {getattr(self, k)!r}" for k in ("steps", "samples_per_image", "sample_steps") if getattr(self, k) < 1]
        if self.lr is not None and not self.lr > 0:
            out.append(f"lr must be a number > 0, or null for the base training config's train.lr; got {self.lr!r}")
        out += choice_problem("sampler", self.sampler, ("ddim", "ddpm"))
        bad = [o for o in self.train_overrides if "=" not in o]
        if bad:
            out.append(f"train_overrides must be key=value strings for the training config, got {bad}")
        return out


@dataclass
class ProtectConfig(Section):
    seed: int = 0
    input: str = ""  # folder of images (read recursively); optional metadata.jsonl (file_name, text)
    model: str = ""  # local diffusers Stable Diffusion-style directory (vae/ unet/ text_encoder/ tokenizer/ scheduler/)
    output: str = ""  # folder for the protected PNGs (same relative paths, .png), metadata.jsonl, report.md, summary.json
    objective: str = "sds-"  # advdm+ | advdm- | photoguard | mist | sds+ | sds- | sdst | random (the null control: a random sign of size eps at every pixel)
    eps: float = 0.06274509803921569  # L_inf budget as a fraction of the pixel range: 16/255 (eps=16/255 on the command line), 0.0627 also means 16 levels
    step_size: float = 0.00392156862745098  # PGD step (1/255)
    steps: int = 100
    t_range: list[int] = field(default_factory=lambda: [0, 999])  # inclusive timestep range sampled per image and step
    textural_weight: float = 1.0  # weight of the textural term in mist (and in sdst with sdst_weighting=textural_weight)
    sdst_weighting: str = "diff-protect"  # diff-protect: step sign(target_rate * J^T(eps_hat - eps) + J^T 2(z - z_target)) (sum-MSE), as the official code; textural_weight: -L_S(SDS) - textural_weight * L_T with per-element means
    target_rate: float = 5.0  # Diff-Protect's SDST rate (its configs/attack/base.yaml target_rate)
    random_start: str = "auto"  # auto: uniform start in the eps-ball for advdm+/-, photoguard and mist (Diff-Protect runs them through advertorch's LinfPGDAttack, rand_init=True), none for the SDS objectives (its pgd_sds default); always | never for every objective
    encoder_latent: str = "sample"  # sample: a fresh posterior sample of the encoder at every PGD step (Diff-Protect's get_first_stage_encoding); mean: the posterior mean
    target: str = ""  # target image for photoguard/mist/sdst; "" = built-in stripe pattern
    caption: str = "a photo"  # caption for images without one in metadata.jsonl
    batch_size: int = 4  # images protected together (images of different sizes go in different batches)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float16 | bfloat16
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    mimicry: MimicrySettings = field(default_factory=MimicrySettings)
    # purifications applied to the clean and the protected images before SDEdit and fine-tuning;
    # e.g. purification=[{kind: jpeg}, {kind: diffpure, t_star: 100}]; [] = evaluate without purification only
    purification: list[PurificationSettings] = field(default_factory=list)

    def problems(self) -> list[str]:
        from eidetic.protection import eps_in_levels

        out = [f"'{key}' is required (e.g. {key}=path/to/dir)" for key in ("input", "model", "output") if not getattr(self, key)]
        out += choice_problem("objective", self.objective, (*OBJECTIVES, RANDOM))
        out += choice_problem("dtype", self.dtype, DTYPES)
        try:
            eps_in_levels(self.eps)
        except ValueError as exc:
            out.append(str(exc))
        if not self.step_size > 0:
            out.append(f"step_size must be > 0 (1/255 = {1 / 255:.5f}), got {self.step_size}")
        if self.steps < 1:
            out.append(f"steps must be >= 1, got {self.steps}")
        tr = list(self.t_range)
        if len(tr) != 2 or not 0 <= tr[0] <= tr[1]:
            out.append(f"t_range must be [min, max] integers with 0 <= min <= max, got {tr}")
        if self.target and self.objective not in TEXTURAL_OBJECTIVES:
            out.append(f"target is only used by {', '.join(TEXTURAL_OBJECTIVES)}; objective {self.objective!r} ignores it (drop target=...)")
        out += choice_problem("sdst_weighting", self.sdst_weighting, PGD_SDST_WEIGHTINGS)
        out += choice_problem("random_start", self.random_start, RANDOM_STARTS)
        out += choice_problem("encoder_latent", self.encoder_latent, ENCODER_LATENTS)
        if not self.target_rate > 0:
            out.append(f"target_rate must be > 0 (Diff-Protect's default is 5), got {self.target_rate}")
        labels = [p.label() for p in self.purification]
        if len(set(labels)) != len(labels):
            out.append(f"purification names must be unique (set name= on repeated kinds), got {labels}")
        if self.mimicry.enabled and not self.mimicry.unpurified:
            if not self.purification:
                out.append("mimicry.unpurified=false fine-tunes on purified copies only, so it needs a purification "
                           "(e.g. purification=[{kind: jpeg}]); or drop mimicry.unpurified=false")
            elif self.mimicry.clean_run and len(self.purification) > 1:
                out.append(f"with mimicry.unpurified=false, mimicry.clean_run names the clean fine-tune of one purification; "
                           f"{len(self.purification)} are given ({', '.join(labels)}): run them one at a time or drop mimicry.clean_run")
        if self.batch_size < 1:
            out.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.device in ("auto", "cpu") or str(self.device).startswith("cuda")):
            out.append(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        return out
