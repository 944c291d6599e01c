"""The imitation workflow: how much does one before/after example leak of an image-to-image model?

For every teacher (and every example size) a student network is trained from the single
(input, output) pair on random crops with an L2 loss, then compared with the teacher on
held-out scikit-image photographs (Spingarn & Michaeli 2024). The run directory gets
config.yaml, summary.json (``imitation`` section), report.md, students/*.safetensors, CSV/W&B
logs and, for a size sweep, psnr_vs_example_size.png. Schema:
:class:`eidetic.schema.imitate.ImitateConfig`.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from eidetic import imitation
from eidetic.config import load, to_yaml
from eidetic.errors import ConfigError, ModelLoadError
from eidetic.pipelines import load_diffusion_model
from eidetic.schema.imitate import ImitateConfig

from eidetic.imitation import PASS_PSNR

from .imitate_report import render_report, write_plot
from .rundir import RunDirectory

__all__ = ["Schema", "load_config", "resolve_teachers", "train_one", "run", "done_message", "TEACHER_GROUPS"]

Schema = ImitateConfig


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    return load(Schema, files, overrides)


TEACHER_GROUPS = {
    "classical": ["gaussian_blur", "unsharp_mask", "tv_denoise", "bicubic_sr"],
    "restoration": ["wavelet_denoise", "richardson_lucy"],
    "blind": ["wavelet_denoise_blind"],
    "control": ["random_noise_control"],
}
TEACHER_GROUPS["all"] = [n for group in ("classical", "restoration", "blind", "control") for n in TEACHER_GROUPS[group]]


def resolve_teachers(spec: str | None, has_pair: bool) -> list[str]:
    if spec is None:
        return [] if has_pair else ["gaussian_blur"]
    if not isinstance(spec, str):
        raise ConfigError(f"config key 'teacher' expects a string (name, module:function or a,b,c), got {spec!r}")
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        names.extend(TEACHER_GROUPS.get(part, [part]))
    if has_pair and len(names) > 1:
        raise ConfigError("with input/output files give at most one teacher (the reference for held-out evaluation)")
    return list(dict.fromkeys(names))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _check_cfg(cfg: DictConfig) -> None:
    for key in ("input", "output"):
        if cfg[key] is not None and not Path(cfg[key]).is_file():
            raise imitation.ImitationError(f"{key}={cfg[key]}: file not found (give the model's before/after image files)")


def _center_pair(x: np.ndarray, y: np.ndarray, size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned central crops: ``size`` in the input, ``scale * size`` at the same place in the output."""
    if size <= 0:
        return x, y
    h, w = x.shape[:2]
    if size > min(h, w):
        raise imitation.ImitationError(f"example size {size} exceeds the example input ({h}x{w})")
    top, left = (h - size) // 2, (w - size) // 2
    return (np.ascontiguousarray(x[top : top + size, left : left + size]),
            np.ascontiguousarray(y[scale * top : scale * (top + size), scale * left : scale * (left + size)]))


def _diffusion_teacher(cfg: DictConfig) -> imitation.Teacher:
    d = cfg.teachers.diffusion
    if not isinstance(d.model_dir, str):
        raise ConfigError("teacher=diffusion needs teachers.diffusion.model_dir=<a run's model/ directory>")
    try:
        model = load_diffusion_model(d.model_dir, device="cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    except ModelLoadError as exc:
        raise imitation.ImitationError(str(exc)) from exc
    return imitation.diffusion_teacher(model, d.timestep, d.caption, d.guidance, d.noise, seed=cfg.seed)


def train_one(cfg: DictConfig, x_img: np.ndarray, y_img: np.ndarray, heldout: list[imitation.HeldoutPair] | None,
              run_dir: RunDirectory, tag: str) -> dict:
    """Train one student on one pair; evaluate on the held-out pairs. Returns its result row."""
    import lightning.pytorch as pl
    import torch

    from lightning_modules.imitation import ImitationModule, fit_student

    x, y = imitation.to_tensor(x_img), imitation.to_tensor(y_img)
    scale = imitation.check_pair(x, y, cfg.train.crop_size)
    pl.seed_everything(cfg.seed, verbose=False)
    s = cfg.student
    student = imitation.build_student(s.arch, s.width, s.depth, s.kernel_size, scale, s.blocks_per_level)
    rf = imitation.receptive_field(student)
    margin = cfg.train.loss_margin if cfg.train.loss_margin >= 0 else min(rf // 2, cfg.train.crop_size // 4)
    sampler = imitation.RandomCropSampler(x, y, cfg.train.crop_size, cfg.train.batch_size, margin,
                                   generator=torch.Generator().manual_seed(cfg.seed))
    monitor = (heldout or [])[: cfg.eval.monitor_images]
    module = ImitationModule(student, sampler, monitor, lr=cfg.train.lr, max_steps=cfg.train.steps,
                             warmup_steps=cfg.train.warmup_steps, lr_schedule=cfg.train.lr_schedule,
                             weight_decay=cfg.train.weight_decay)
    loggers = run_dir.loggers(cfg.logging, name=f"{cfg.run.name}-{tag}", group=cfg.run.name, csv_name=f"logs/{tag}/metrics.csv",
                              config=OmegaConf.to_container(cfg, resolve=True))
    start = time.perf_counter()
    fit_student(module, cfg.train.steps, cfg.eval.every_n_steps, loggers, accelerator=cfg.trainer.accelerator,
                devices=cfg.trainer.devices, precision=cfg.trainer.precision,
                log_every_n_steps=cfg.trainer.log_every_n_steps, enable_progress_bar=cfg.trainer.enable_progress_bar)
    seconds = time.perf_counter() - start
    run_dir.finish()  # one W&B run per student
    student = module.student.cpu().float()
    ckpt = run_dir / "students" / f"{tag}.safetensors"
    imitation.save_student(student, ckpt, tag=tag, example_size=str(x.shape[-1]))
    row = {
        "example_size": [int(x.shape[-2]), int(x.shape[-1])],
        "example_pixels": int(x.shape[-2] * x.shape[-1]),
        "scale": scale,
        "receptive_field": rf,
        "loss_margin": margin,
        "parameters": sum(p.numel() for p in student.parameters()),
        "steps": cfg.train.steps,
        "train_seconds": round(seconds, 2),
        "example_fit_psnr": imitation.image_metrics(imitation.apply_student(student, x), y)["psnr"],
        "checkpoint": str(ckpt.relative_to(run_dir.path)),
        "heldout": imitation.evaluate_student(student, heldout, scale) if heldout else None,
    }
    return row


def run(cfg: DictConfig) -> Path:
    """Train and evaluate one student per teacher (and example size); returns the run directory."""
    _check_cfg(cfg)
    has_pair = cfg.input is not None
    teacher_names = resolve_teachers(cfg.teacher, has_pair)
    sizes = list(cfg.example_sizes) or [int(cfg.example_size)]
    tparams = OmegaConf.to_container(cfg.teachers, resolve=True)
    # teachers first: a bad name fails before any run directory is created
    teachers = [_diffusion_teacher(cfg) if n == "diffusion" else imitation.build_teacher(n, tparams.get(n), seed=cfg.seed)
                for n in teacher_names]
    run_dir = RunDirectory(cfg.run.dir or RunDirectory.default_path(cfg.run.name)).create()
    cfg.run.dir = str(run_dir.path)
    run_dir.write_text("config.yaml", to_yaml(cfg))

    if has_pair:
        source = imitation.load_image(cfg.input)
        pair_out = imitation.load_image(cfg.output)
        pair_scale = imitation.output_scale(source.shape[:2], pair_out.shape[:2], what=f"pair {cfg.input} -> {cfg.output}")
        studies = [(teachers[0] if teachers else None, "pair")]
    else:
        source = imitation.load_image(cfg.example)
        studies = [(t, t.name) for t in teachers]

    results = {}
    for teacher, label in studies:
        heldout = None
        if teacher is not None:
            heldout = imitation.heldout_pairs(teacher, list(cfg.eval.images), exclude=[source], crop=cfg.eval.crop)
        deterministic = None
        if teacher is not None and teacher.blind is None and not teacher.stochastic:  # user callable: probe it
            deterministic = imitation.is_deterministic(teacher, imitation.center_crop(source, min(64, *source.shape[:2])))
        elif teacher is not None:
            deterministic = not teacher.stochastic
        rows = []
        for size in sizes:
            if has_pair:
                x_img, y_img = _center_pair(source, pair_out, size, pair_scale)
            else:
                x_img = imitation.center_crop(source, size)
                if teacher.inputs is not None:  # restoration teacher: its input is a degraded photograph
                    x_img = teacher.inputs.apply(x_img, teacher.inputs.level, key=f"example:{cfg.example}")
                n_calls = len(teacher.calls)
                y_img = teacher(x_img)
            example_record = teacher.calls[-1] if teacher is not None and not has_pair and len(teacher.calls) > n_calls else None
            tag = f"{_slug(label)}_{x_img.shape[0]}" if size > 0 or len(sizes) > 1 else _slug(label)
            print(f"[imitate] {label}: example {x_img.shape[0]}x{x_img.shape[1]}, {cfg.train.steps} steps", flush=True)
            row = train_one(cfg, x_img, y_img, heldout, run_dir, tag)
            if example_record is not None:
                row["example_teacher_record"] = example_record  # what the teacher drew / estimated on the example
            if row["heldout"]:
                print(f"[imitate] {label}: held-out PSNR {row['heldout']['psnr']:.2f} dB "
                      f"(identity {row['heldout']['identity_psnr']:.2f} dB), SSIM {row['heldout']['ssim']:.3f}", flush=True)
            rows.append(row)
        blind = teacher.blind if teacher is not None else None
        stochastic = bool(teacher.stochastic) if teacher is not None else False
        inputs = teacher.inputs if teacher is not None else None
        results[label] = {
            "teacher": teacher.name if teacher is not None else None,
            "description": teacher.description if teacher is not None else f"pair {cfg.input} -> {cfg.output}",
            "params": teacher.params if teacher is not None else {},
            "kind": teacher.kind if teacher is not None else "unknown",
            "blind": blind,
            "stochastic": stochastic,
            "negative_control": stochastic,
            "deterministic": deterministic,
            "inputs": ({"degradation": inputs.kind, "example_level": inputs.level, "heldout_levels": list(inputs.heldout_levels)}
                       if inputs is not None else None),
            "results": rows,
            # the audit's bar (on the mean over held-out images) applies to fixed teachers only;
            # every image is also checked against it (per_image[...]["meets_bar"])
            "meets_psnr_bar": (all(r["heldout"]["psnr"] >= PASS_PSNR for r in rows)
                               if blind is False and not stochastic and all(r["heldout"] for r in rows) else None),
        }

    plot = None
    if len(sizes) > 1 and any(r["results"][0]["heldout"] for r in results.values()):
        plot = "psnr_vs_example_size.png"
        write_plot(results, run_dir / plot)
    section = {
        "command": " ".join(shlex.quote(a) for a in sys.argv) if sys.argv and sys.argv[0] else "",
        "example": cfg.input if has_pair else cfg.example,
        "example_output": cfg.output if has_pair else None,
        "student": OmegaConf.to_container(cfg.student, resolve=True),
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "eval_images": [p for p in cfg.eval.images],
        "eval_crop": cfg.eval.crop,
        "psnr_bar_db": PASS_PSNR,
        "plot": plot,
        "teachers": results,
    }
    run_dir.update_summary("imitation", section)
    run_dir.write_text("report.md", render_report(section))
    return run_dir.path


def done_message(path: Path) -> str:
    return f"[imitate] run directory: {path}"


def console_summary(path: Path):
    from .imitate_report import console_summary as summary

    return summary(path)
