"""Single-example imitation audit: how much does one before/after example leak of an image-to-image model?

    python imitate.py [--config configs/imitate.yaml ...] teacher=gaussian_blur example=astronaut key=value ...
    python imitate.py teacher=classical example_sizes=[48,96,192]
    python imitate.py input=before.png output=after.png [teacher=mypkg.ops:fn]

For every teacher (and every example size) a student network is trained from the single
(input, output) pair on random crops with an L2 loss, then compared with the teacher on
held-out scikit-image photographs. The run directory gets config.yaml, summary.json
(``imitation`` section), report.md, students/*.safetensors, CSV/W&B logs and, for a size
sweep, psnr_vs_example_size.png. Schema: configs/imitate.yaml.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from eidetic import imitation as im
from eidetic.config import ConfigError, load_config, to_yaml
from eidetic.io import update_summary, write_text_atomic

SCHEMA = Path(__file__).resolve().parent / "configs" / "imitate.yaml"
TEACHER_GROUPS = {
    "classical": ["gaussian_blur", "unsharp_mask", "tv_denoise", "bicubic_sr"],
    "blind": ["blind_blur", "blind_noise"],
}
TEACHER_GROUPS["all"] = TEACHER_GROUPS["classical"] + TEACHER_GROUPS["blind"]
PASS_PSNR = 30.0  # the bar the audit checks for non-blind teachers (Spingarn & Michaeli report ~31 dB+)


def parse_args(argv=None) -> tuple[list[str], list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) merged over configs/imitate.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher=tv_denoise train.steps=400")
    args = parser.parse_args(argv)
    return args.config, args.overrides


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
    if (cfg.input is None) != (cfg.output is None):
        raise ConfigError("give both input=<file> and output=<file> (the model's before/after pair), or neither")
    for key in ("input", "output"):
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise ConfigError(f"config key '{key}' expects an image file path, got {cfg[key]!r}")
    sizes = list(cfg.example_sizes)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ConfigError(f"example_sizes must be a list of positive integers, got {sizes}")
    for size in sizes + ([cfg.example_size] if cfg.example_size > 0 else []):
        if size < cfg.train.crop_size:
            raise im.ImitationError(
                f"example size {size} is smaller than the training crop size {cfg.train.crop_size}: "
                f"drop it or set train.crop_size <= {size}"
            )


def _center_pair(x: np.ndarray, y: np.ndarray, size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned central crops: ``size`` in the input, ``scale * size`` at the same place in the output."""
    if size <= 0:
        return x, y
    h, w = x.shape[:2]
    if size > min(h, w):
        raise im.ImitationError(f"example size {size} exceeds the example input ({h}x{w})")
    top, left = (h - size) // 2, (w - size) // 2
    return (np.ascontiguousarray(x[top : top + size, left : left + size]),
            np.ascontiguousarray(y[scale * top : scale * (top + size), scale * left : scale * (left + size)]))


def _loggers(cfg: DictConfig, run_dir: Path, tag: str):
    loggers = []
    if cfg.logging.csv:
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=tag))
    if cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.logging.wandb.project, name=f"{cfg.run.name}-{tag}", group=cfg.run.name,
                                   save_dir=str(run_dir), mode=cfg.logging.wandb.mode,
                                   config=OmegaConf.to_container(cfg, resolve=True)))
    return loggers


def _diffusion_teacher(cfg: DictConfig) -> im.Teacher:
    d = cfg.teachers.diffusion
    if not isinstance(d.model_dir, str):
        raise ConfigError("teacher=diffusion needs teachers.diffusion.model_dir=<a run's model/ directory>")
    from lightning_modules.models import ModelLoadError, load_diffusion_model

    try:
        model = load_diffusion_model(d.model_dir, device="cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    except ModelLoadError as exc:
        raise im.ImitationError(str(exc)) from exc
    return im.diffusion_teacher(model, d.timestep, d.caption, d.guidance, d.noise, seed=cfg.seed)


def train_one(cfg: DictConfig, x_img: np.ndarray, y_img: np.ndarray, heldout: list[im.HeldoutPair] | None,
              run_dir: Path, tag: str) -> dict:
    """Train one student on one pair; evaluate on the held-out pairs. Returns its result row."""
    import lightning.pytorch as pl
    import torch

    from lightning_modules.imitation import ImitationModule, fit_student

    x, y = im.to_tensor(x_img), im.to_tensor(y_img)
    scale = im.check_pair(x, y, cfg.train.crop_size)
    pl.seed_everything(cfg.seed, verbose=False)
    s = cfg.student
    student = im.build_student(s.arch, s.width, s.depth, s.kernel_size, scale, s.blocks_per_level)
    rf = im.receptive_field(student)
    margin = cfg.train.loss_margin if cfg.train.loss_margin >= 0 else min(rf // 2, cfg.train.crop_size // 4)
    sampler = im.RandomCropSampler(x, y, cfg.train.crop_size, cfg.train.batch_size, margin,
                                   generator=torch.Generator().manual_seed(cfg.seed))
    monitor = (heldout or [])[: cfg.eval.monitor_images]
    module = ImitationModule(student, sampler, monitor, lr=cfg.train.lr, max_steps=cfg.train.steps,
                             warmup_steps=cfg.train.warmup_steps, lr_schedule=cfg.train.lr_schedule,
                             weight_decay=cfg.train.weight_decay)
    loggers = _loggers(cfg, run_dir, tag)
    start = time.perf_counter()
    fit_student(module, cfg.train.steps, cfg.eval.every_n_steps, loggers, accelerator=cfg.trainer.accelerator,
                devices=cfg.trainer.devices, precision=cfg.trainer.precision,
                log_every_n_steps=cfg.trainer.log_every_n_steps, enable_progress_bar=cfg.trainer.enable_progress_bar)
    seconds = time.perf_counter() - start
    for logger in loggers:
        if logger.__class__.__name__ == "WandbLogger":
            logger.experiment.finish()
    student = module.student.cpu().float()
    ckpt = run_dir / "students" / f"{tag}.safetensors"
    im.save_student(student, ckpt, tag=tag, example_size=str(x.shape[-1]))
    row = {
        "example_size": [int(x.shape[-2]), int(x.shape[-1])],
        "example_pixels": int(x.shape[-2] * x.shape[-1]),
        "scale": scale,
        "receptive_field": rf,
        "loss_margin": margin,
        "parameters": sum(p.numel() for p in student.parameters()),
        "steps": cfg.train.steps,
        "train_seconds": round(seconds, 2),
        "example_fit_psnr": im.image_metrics(im.apply_student(student, x), y)["psnr"],
        "checkpoint": str(ckpt.relative_to(run_dir)),
        "heldout": im.evaluate_student(student, heldout, scale) if heldout else None,
    }
    return row


def run_imitation(cfg: DictConfig, command: str = "") -> dict:
    _check_cfg(cfg)
    has_pair = cfg.input is not None
    teacher_names = resolve_teachers(cfg.teacher, has_pair)
    sizes = list(cfg.example_sizes) or [int(cfg.example_size)]
    tparams = OmegaConf.to_container(cfg.teachers, resolve=True)
    # teachers first: a bad name fails before any run directory is created
    teachers = [_diffusion_teacher(cfg) if n == "diffusion" else im.build_teacher(n, tparams.get(n), seed=cfg.seed)
                for n in teacher_names]
    run_dir = Path(cfg.run.dir) if cfg.run.dir else Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{cfg.run.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))

    if has_pair:
        source = im.load_image(cfg.input)
        pair_out = im.load_image(cfg.output)
        pair_scale = im.output_scale(source.shape[:2], pair_out.shape[:2], what=f"pair {cfg.input} -> {cfg.output}")
        studies = [(teachers[0] if teachers else None, "pair")]
    else:
        source = im.load_image(cfg.example)
        studies = [(t, t.name) for t in teachers]

    results = {}
    for teacher, label in studies:
        heldout = None
        if teacher is not None:
            heldout = im.heldout_pairs(teacher, list(cfg.eval.images), exclude=[source], crop=cfg.eval.crop)
        deterministic = None
        if teacher is not None and teacher.blind is None:  # user callable: probe it
            deterministic = im.is_deterministic(teacher, im.center_crop(source, min(64, *source.shape[:2])))
        rows = []
        for size in sizes:
            if has_pair:
                x_img, y_img = _center_pair(source, pair_out, size, pair_scale)
            else:
                x_img = im.center_crop(source, size)
                n_draws = len(teacher.draws)
                y_img = teacher(x_img)
            example_draw = teacher.draws[-1] if teacher is not None and not has_pair and len(teacher.draws) > n_draws else None
            tag = f"{_slug(label)}_{x_img.shape[0]}" if size > 0 or len(sizes) > 1 else _slug(label)
            print(f"[imitate] {label}: example {x_img.shape[0]}x{x_img.shape[1]}, {cfg.train.steps} steps", flush=True)
            row = train_one(cfg, x_img, y_img, heldout, run_dir, tag)
            if example_draw is not None:
                row["example_teacher_draw"] = example_draw  # what the blind teacher did to the training example
            if row["heldout"]:
                print(f"[imitate] {label}: held-out PSNR {row['heldout']['psnr']:.2f} dB "
                      f"(identity {row['heldout']['identity_psnr']:.2f} dB), SSIM {row['heldout']['ssim']:.3f}", flush=True)
            rows.append(row)
        blind = teacher.blind if teacher is not None else None
        results[label] = {
            "teacher": teacher.name if teacher is not None else None,
            "description": teacher.description if teacher is not None else f"pair {cfg.input} -> {cfg.output}",
            "params": teacher.params if teacher is not None else {},
            "blind": blind,
            "deterministic": deterministic,
            "results": rows,
            # the audit's bar applies to fixed (non-blind) operators only
            "meets_psnr_bar": (all(r["heldout"]["psnr"] >= PASS_PSNR for r in rows)
                               if blind is False and all(r["heldout"] for r in rows) else None),
        }

    plot = None
    if len(sizes) > 1 and any(r["results"][0]["heldout"] for r in results.values()):
        plot = "psnr_vs_example_size.png"
        write_plot(results, run_dir / plot)
    section = {
        "command": command,
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
    update_summary(run_dir, "imitation", section)
    write_text_atomic(run_dir / "report.md", render_report(section))
    print(f"[imitate] run directory: {run_dir}", flush=True)
    return section


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (label, res) in enumerate(results.items()):
        rows = [r for r in res["results"] if r["heldout"]]
        if not rows:
            continue
        sizes = [r["example_size"][0] for r in rows]
        color = f"C{i}"
        style = "--" if res["blind"] else "-"
        ax.plot(sizes, [r["heldout"]["psnr"] for r in rows], style, marker="o", color=color,
                label=f"{label}{' (blind)' if res['blind'] else ''}")
        ax.plot(sizes, [r["heldout"]["identity_psnr"] for r in rows], ":", color=color, alpha=0.5)
    ax.axhline(PASS_PSNR, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("example side (pixels)")
    ax.set_ylabel("held-out PSNR vs teacher (dB)")
    ax.set_title("Single-example imitation (dotted: identity baseline)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: never hides a curve
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_report(section: dict) -> str:
    s = section["student"]
    lines = [
        "# Single-example imitation audit",
        "",
        f"Command: `{section['command']}`" if section["command"] else "",
        "",
        f"Example: `{section['example']}`" + (f" → `{section['example_output']}`" if section["example_output"] else ""),
        f"Student: {s['arch']} width {s['width']} depth {s['depth']} kernel {s['kernel_size']}; "
        f"{section['train']['steps']} steps, crops {section['train']['crop_size']} px, batch {section['train']['batch_size']}, L2.",
        f"Held-out: {', '.join(section['eval_images'])} (training example excluded), central {section['eval_crop']} px.",
        "",
        "| teacher | blind | example | student PSNR (dB) | worst image | SSIM | identity PSNR | fit on example | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, res in section["teachers"].items():
        for r in res["results"]:
            h = r["heldout"]
            blind = {True: "yes", False: "no", None: "unknown"}[res["blind"]]
            size = "x".join(str(v) for v in r["example_size"])
            if h:
                lines.append(f"| {label} | {blind} | {size} | {h['psnr']:.2f} | {h['psnr_min']:.2f} | {h['ssim']:.3f} | "
                             f"{h['identity_psnr']:.2f} | {r['example_fit_psnr']:.2f} | {r['train_seconds']:.0f} |")
            else:
                lines.append(f"| {label} | {blind} | {size} | – | – | – | – | {r['example_fit_psnr']:.2f} | {r['train_seconds']:.0f} |")
    lines += ["", f"Bar: non-blind teachers should reach ≥ {section['psnr_bar_db']:.0f} dB on held-out images."]
    for label, res in section["teachers"].items():
        if res["meets_psnr_bar"] is not None:
            lines.append(f"- {label}: {'meets' if res['meets_psnr_bar'] else 'MISSES'} the bar")
        elif res["blind"]:
            draws = [r.get("example_teacher_draw") for r in res["results"] if r.get("example_teacher_draw")]
            shown = f" (training example drew {draws[0]})" if len(draws) == 1 else ""
            lines.append(f"- {label}: blind (parameters drawn per image{shown}): one example cannot pin it down; "
                         "reported as measured, per-image draws in summary.json")
        elif res["results"] and res["results"][0]["heldout"] is None:
            lines.append(f"- {label}: no teacher to query, so no held-out evaluation (give teacher=module:function)")
    if section["plot"]:
        lines += ["", f"![PSNR vs example size]({section['plot']})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    files, overrides = parse_args(argv)
    try:
        cfg = load_config(files, overrides, schema=SCHEMA)
        command = " ".join(["python imitate.py", *(f"--config {shlex.quote(f)}" for f in files), *map(shlex.quote, overrides)])
        run_imitation(cfg, command)
    except (ConfigError, im.ImitationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
