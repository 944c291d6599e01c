"""Mimicry after fine-tuning: does protecting the images stop a model from learning them?

The question a data owner asks of a protective perturbation (Xue et al., ICLR 2024) is not
how an SDEdit of one image looks, but whether someone who fine-tunes a model on the
published images gets a model that reproduces them. This module answers it with the
framework's own training:

1. stage the clean and the protected copies of the same images, with the same captions
   and file names, in two folders of their own (only PNGs and ``metadata.jsonl``);
2. fine-tune the model twice with :func:`workflows.train.run`, identical configs
   except ``data.folder`` and ``run.dir``: same seed, steps, learning rate, batches;
3. sample every caption ``samples_per_image`` times from the untuned model, the
   clean-tuned and the protected-tuned model with identical seeded noise, crop the
   SolidMark border and compare the interior with the *clean* image (SSIM, PSNR).

Protection works when the protected-tuned model reproduces the clean images less well
than the clean-tuned one (a positive drop). The untuned model is the reference: if the
clean-tuned model is no closer to the images than it, the fine-tune was too short to say
anything about protection.

The training config starts from the run that exported the model (``<model>/../config.yaml``:
resolution, border, optimiser) or the training defaults. Monitors, controls, mitigations
and data-set edits (held-out split, dedup, duplication) are switched off, so both
fine-tunes train on exactly the staged images; ``train_overrides`` can change anything
except the folder, run directory, model, seed and steps.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from eidetic.config import check_layer, key_paths, load, parse_overrides
from eidetic.errors import ConfigError
from eidetic.images import METADATA, decode_image, fit_to_resolution, image_files, to_tensor
from eidetic.io import atomic_write, read_summary, write_json_atomic, write_jsonl_atomic, write_text_atomic
from eidetic.pipelines import load_diffusion_model
from eidetic.schema.train import TrainConfig

__all__ = ["ARMS", "MODELS", "base_config", "training_config", "check_geometry", "default_work_dir", "mimicry_after_finetuning"]

ARMS = ("clean", "protected")
MODELS = ("base", "clean_tuned", "protected_tuned")
METRICS = ("ssim_mean", "ssim_best", "psnr_mean", "psnr_best")
MARKER = ".eidetic-mimicry"  # marks a work dir this module may clear


def default_work_dir(output: str | Path) -> Path:
    """``<output>.mimicry`` beside the output folder, never inside it.

    The output is itself an image folder that people train on, and the data module lists
    folders recursively: staged *clean* copies inside it would leak into that training.
    """
    out = Path(output).resolve()
    return out.with_name(out.name + ".mimicry")


# ---- configs ------------------------------------------------------------------------
def _prune(user: dict, prefix: str, valid: set[str], sections: set[str], dropped: list[str]) -> dict:
    kept = {}
    for key, value in user.items():
        path = f"{prefix}{key}"
        if path in sections and isinstance(value, dict):
            kept[key] = _prune(value, path + ".", valid, sections, dropped)
        elif path in valid:
            kept[key] = value
        else:
            dropped.append(path)
    return kept


def base_config(model_dir: str | Path) -> tuple[DictConfig, str, list[str]]:
    """(base layer, where it came from, keys dropped): the exporting run's config, if any.

    A run's ``config.yaml`` written by an older version may hold keys the current schema
    no longer has; they are dropped (and reported) rather than failing the evaluation.
    """
    path = Path(model_dir).resolve().parent / "config.yaml"
    if not path.is_file():
        return OmegaConf.create({}), "the training defaults", []
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers
        raise ConfigError(f"cannot parse {path}, the training config of the model's run: {exc}") from exc
    if not isinstance(raw, DictConfig) or "data" not in raw or "model" not in raw:
        return OmegaConf.create({}), "the training defaults", []  # some other file, not a run's config
    leaves = key_paths(TrainConfig)
    sections = {p.rsplit(".", i)[0] for p in leaves for i in range(1, p.count(".") + 1)}
    dropped: list[str] = []
    pruned = OmegaConf.create(_prune(OmegaConf.to_container(raw), "", set(leaves), sections, dropped))
    errors = check_layer(TrainConfig, OmegaConf.to_container(pruned))
    if errors:
        raise ConfigError(f"invalid training config of the model's run ({path}):\n  " + "\n  ".join(errors))
    return pruned, str(path), dropped


def training_config(model_dir: str | Path, data_dir: str | Path, run_dir: str | Path, section, base: tuple | None = None) -> DictConfig:
    """The fine-tuning config of one arm; the two arms differ only in ``data_dir``/``run_dir``."""
    base_layer, _, _ = base if base is not None else base_config(model_dir)
    off = {
        "data": {
            "heldout_fraction": 0.0, "dedup": False, "small_images": "upscale",
            "duplicate": {"ids": [], "fraction": 0.0, "copies": 1, "own_keys": False},
        },
        "solidmark": {"enabled": False},
        "extraction": {"enabled": False},
        "realism": {"enabled": False},
        "controls": {"enabled": False},
        "mitigation": {"caption": {"methods": []}, "text_noise_sigma": 0.0, "near_dedup": {"enabled": False}, "augment": {"flip": 0.0}, "wen": {"enabled": False}},
        "validation": {"every_n_steps": 0, "captions": []},
        "logging": {"wandb": {"enabled": False, "id": None, "group": None}},
        "train": {"resume": None, "max_epochs": None, "checkpoint": {"every_n_steps": 0}},
        "trainer": {"fast_dev_run": False},
    }
    merged = OmegaConf.merge(base_layer, OmegaConf.create(off))
    overrides = [str(o) for o in section.train_overrides]
    # validated here first so an error names mimicry.train_overrides, not the command line
    try:
        errors = check_layer(TrainConfig, OmegaConf.to_container(parse_overrides(overrides)))
    except ConfigError as exc:
        raise ConfigError(f"mimicry.train_overrides: {exc}") from exc
    if errors:
        raise ConfigError("invalid mimicry.train_overrides (training config keys):\n  " + "\n  ".join(errors))
    cfg = load(TrainConfig, [], overrides, base=merged, base_source="the mimicry fine-tuning config")
    # what makes the two arms comparable, and what the evaluation is about: never overridable
    cfg.run.dir = str(Path(run_dir).resolve())
    cfg.run.name = f"mimicry-{Path(run_dir).name}"
    cfg.data.source = "folder"
    cfg.data.folder = str(Path(data_dir).resolve())
    cfg.model.pretrained = str(Path(model_dir).resolve())
    cfg.seed = int(section.seed)
    cfg.train.max_steps = int(section.steps)
    if section.lr is not None:
        cfg.train.lr = float(section.lr)
    return cfg


def check_geometry(cfg: DictConfig, model_dir: str | Path, source: str = "") -> None:
    """Fail before any work if the model cannot take the config's canvases.

    ``run`` refuses such a model too, but only after protection has already run; this reads
    two small JSON files instead.
    """
    import json

    root = Path(model_dir)
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return  # not loadable at all: the loader's own error says why, later
    vae_path = root / "vae" / "config.json"
    factor = 2 ** (len(json.loads(vae_path.read_text())["block_out_channels"]) - 1) if vae_path.is_file() else 1
    size = unet.get("sample_size")
    if not isinstance(size, int):
        return
    res, border = int(cfg.data.resolution), int(cfg.data.border)
    canvas = res + 2 * border
    if canvas % factor or canvas // factor != size:
        want = size * factor - 2 * border
        raise ConfigError(
            f"mimicry: the model {model_dir} works on {size * factor}px canvases, but its fine-tuning config "
            f"({source or 'the training defaults'}) gives {canvas}px (data.resolution={res} + 2 * data.border={border}). "
            f"Set mimicry.train_overrides=[data.resolution={want}] (or another resolution/border pair with "
            f"resolution + 2 * border = {size * factor}), and use images of that interior size."
        )


# ---- staging ------------------------------------------------------------------------
def _prepare_work_dir(work: Path) -> None:
    if work.exists() and not work.is_dir():
        raise ConfigError(f"mimicry work dir {work} exists and is not a directory")
    if work.is_dir() and any(work.iterdir()) and not (work / MARKER).exists():
        raise ConfigError(f"mimicry work dir {work} is not empty and was not made by a mimicry evaluation; set mimicry.work_dir to a new folder")
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(work / MARKER, "written by the mimicry evaluation; data/, clean/ and protected/ are replaced on every evaluation\n")
    # a stale staged image from an earlier evaluation would be trained on: start clean
    for sub in ("data", *ARMS):
        shutil.rmtree(work / sub, ignore_errors=True)


def _write_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_write(path, "wb") as fh:
        Image.fromarray(arr).save(fh, format="PNG")


def _pairs(clean_dir: Path, protected_dir: Path, files: Sequence[str] | None) -> list[tuple[str, Path, Path]]:
    """(clean file name, clean path, protected path); protection writes ``sub/a.jpg`` as ``sub/a.png``."""
    if files is None:
        images, _ = image_files(clean_dir)
        names = [p.relative_to(clean_dir).as_posix() for p in images]
        by_output: dict[str, list[str]] = {}
        for n in names:
            by_output.setdefault(_protected_name(n), []).append(n)
        files = [v[0] for k, v in by_output.items() if len(v) == 1 and (protected_dir / k).is_file()]
    pairs = []
    for name in files:
        clean, protected = clean_dir / name, protected_dir / _protected_name(name)
        for p in (clean, protected):
            if not p.is_file():
                raise ConfigError(f"mimicry: image not found: {p}")
        pairs.append((name, clean, protected))
    if not pairs:
        raise ConfigError(f"mimicry: no image in {clean_dir} has a protected copy (same path, .png) in {protected_dir}")
    return pairs


def _protected_name(name: str) -> str:
    return Path(name).with_suffix(".png").as_posix()


# ---- measuring ----------------------------------------------------------------------
@torch.no_grad()
def _reproduction(model, captions: Sequence[str], targets: torch.Tensor, section, canvas: int, border: int) -> tuple[np.ndarray, np.ndarray]:
    """(SSIM, PSNR), each (images, samples): generated interiors vs the clean images."""
    from eidetic.diffusion import generate
    from eidetic.protection import image_similarity

    k, res = int(section.samples_per_image), targets.shape[-1]
    ssim, psnr = [], []
    for i, caption in enumerate(captions):
        # seeded per image, not per call order: every model sees exactly the same noise
        g = torch.Generator().manual_seed(int(section.seed) * 1_000_003 + i)
        x = generate(model, [caption] * k, (canvas, canvas), steps=int(section.sample_steps), guidance=float(section.guidance), generator=g, sampler=str(section.sampler))
        interior = x[..., border : border + res, border : border + res].cpu()
        sim = image_similarity(interior, targets[i : i + 1].expand(k, -1, -1, -1))
        ssim.append(sim["ssim"].numpy())
        psnr.append(sim["psnr"].numpy())
    return np.stack(ssim), np.stack(psnr)


def _per_image_scores(ssim: np.ndarray, psnr: np.ndarray) -> dict[str, np.ndarray]:
    return {"ssim_mean": ssim.mean(1), "ssim_best": ssim.max(1), "psnr_mean": psnr.mean(1), "psnr_best": psnr.max(1)}


def _standard_error(x: np.ndarray) -> float | None:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def _loss_tail(metrics_csv: Path, fraction: float = 0.25) -> float | None:
    """Mean logged training loss over the last quarter of the run: one step's loss is noisy."""
    if not metrics_csv.is_file():
        return None
    with metrics_csv.open() as fh:
        losses = [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    if not losses:
        return None
    tail = losses[-max(1, math.ceil(len(losses) * fraction)) :]
    return float(np.mean(tail))


def _finetune_record(cfg: DictConfig, run_dir: Path, total: float | None) -> dict:
    train = read_summary(run_dir).get("train", {})
    return {
        "run_dir": str(run_dir),
        "seed": int(cfg.seed),
        "max_steps": int(cfg.train.max_steps),
        "lr": float(cfg.train.lr),
        "global_step": train.get("global_step"),
        "train_images": train.get("train_images"),
        "final_loss": train.get("final_loss"),
        "loss_last_quarter_mean": _loss_tail(run_dir / "metrics.csv"),
        "wall_time_s": train.get("wall_time_s"),
        "total_seconds": None if total is None else round(total, 2),
    }


def _finetune(cfg: DictConfig) -> dict:
    from . import train

    started = time.perf_counter()
    run_dir = train.run(cfg)
    return _finetune_record(cfg, Path(run_dir), time.perf_counter() - started)


_RUN_KEYS = ("run.dir", "run.name", "data.folder", "logging.wandb.id")  # what differs between two fine-tunes of the same images


def check_reusable_clean_run(run_dir: str | Path, cfg: DictConfig, images: bool = True) -> Path:
    """``run_dir`` if it is a finished fine-tune with ``cfg`` (up to its directory and data
    folder) on byte-identical staged images to ``cfg.data.folder``'s (``images=False``: the
    config only, before anything is staged); else a ConfigError saying what differs. Lets
    several protections of the same images share one clean fine-tune."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "model" / "model_index.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"mimicry.clean_run={run_dir} is not a finished fine-tune (no model/ or config.yaml): "
                          "point it at the clean/ run directory of an earlier mimicry evaluation")
    from .train import changed_settings

    differ = changed_settings(cfg, run_dir / "config.yaml", sections=("",), ignore=_RUN_KEYS)
    if differ:
        raise ConfigError(f"mimicry.clean_run={run_dir} was fine-tuned with another config ({'; '.join(differ[:4])}"
                          f"{f' and {len(differ) - 4} more' if len(differ) > 4 else ''}); it cannot stand in for this evaluation's clean fine-tune")
    if not images:
        return run_dir
    here, there = Path(cfg.data.folder), Path(OmegaConf.load(run_dir / "config.yaml").data.folder)
    names = sorted(p.name for p in here.iterdir())
    if not there.is_dir() or sorted(p.name for p in there.iterdir()) != names:
        raise ConfigError(f"mimicry.clean_run={run_dir} was fine-tuned on other images ({there}) than this evaluation stages ({here})")
    changed = [n for n in names if (here / n).read_bytes() != (there / n).read_bytes()]
    if changed:
        raise ConfigError(f"mimicry.clean_run={run_dir} was fine-tuned on other pixels or captions: {', '.join(changed[:5])} differ")
    return run_dir


# ---- the evaluation -----------------------------------------------------------------
def mimicry_after_finetuning(
    model_dir: str | Path,
    clean_dir: str | Path,
    protected_dir: str | Path,
    captions: Mapping[str, str],
    section,
    work_dir: str | Path,
    *,
    files: Sequence[str] | None = None,
    default_caption: str = "",
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    references: Mapping[str, str | Path] | None = None,
    clean_run: str | Path | None = None,
) -> dict:
    """Fine-tune ``model_dir`` on clean and on protected copies; compare how each reproduces the clean images.

    Args:
        clean_dir, protected_dir: the originals and ``protect.py``'s output; ``files`` are the
            clean file names to use (default: every clean image with a ``<stem>.png`` twin).
        captions: clean file name -> caption (``default_caption`` for the others); both
            fine-tunes and every generation use the same caption per image.
        section: ``steps``, ``lr`` (None: the base config's), ``seed``, ``samples_per_image``,
            ``sampler``, ``sample_steps``, ``guidance``, ``train_overrides`` (the protection
            config's ``mimicry`` section).
        work_dir: staged folders (``data/clean``, ``data/protected``) and the two run
            directories (``clean/``, ``protected/``), kept for inspection.
        references: clean file name -> the image generations are compared with (default: the
            clean image itself); purified arms train on purified copies but are still scored
            against the original clean images.
        clean_run: a finished clean fine-tune of the same images with the same config (e.g. the
            ``clean/`` run of an earlier evaluation with another protection) used instead of
            fine-tuning on the clean images again (:func:`check_reusable_clean_run`).

    Returns the summary (also written to ``work_dir/mimicry.json``), with ``per_image`` rows.
    """
    say = progress or (lambda message: None)
    model_dir, clean_dir, protected_dir, work = Path(model_dir), Path(clean_dir), Path(protected_dir), Path(work_dir).resolve()
    base = base_config(model_dir)
    configs = {arm: training_config(model_dir, work / "data" / arm, work / arm, section, base) for arm in ARMS}
    check_geometry(configs["clean"], model_dir, base[1])
    pairs = _pairs(clean_dir, protected_dir, files)
    _prepare_work_dir(work)

    res, border = int(configs["clean"].data.resolution), int(configs["clean"].data.border)
    canvas = res + 2 * border
    warnings_: list[str] = []
    if base[2]:
        warnings_.append(f"keys of {base[1]} unknown to the current schema were ignored: {', '.join(base[2])}")
    rows, targets, off_size = [], [], []
    for name, clean_path, protected_path in pairs:
        staged = _protected_name(name)
        clean = decode_image(clean_path)
        protected = decode_image(protected_path)
        if protected.shape != clean.shape:
            raise ConfigError(f"mimicry: {protected_path} is {protected.shape[1]}x{protected.shape[0]} but its clean image {clean_path} is {clean.shape[1]}x{clean.shape[0]}")
        if clean.shape[:2] != (res, res):
            off_size.append(f"{name} ({clean.shape[1]}x{clean.shape[0]})")
        # clean copies as decoded (EXIF applied), i.e. the pixels the perturbation was added to
        _write_png(clean, work / "data" / "clean" / staged)
        with atomic_write(work / "data" / "protected" / staged, "wb") as fh:
            fh.write(protected_path.read_bytes())  # the published file, byte for byte
        # the data module trains on fit_to_resolution(image); the clean target must match it
        reference = decode_image(references[name]) if references is not None else clean
        targets.append(to_tensor(fit_to_resolution(reference, res)))
        rows.append({"file_name": staged, "text": captions.get(name, default_caption), "_clean": name})
    if off_size:
        warnings_.append(
            f"{len(off_size)} image(s) are not {res}x{res}, the model's interior resolution: {', '.join(off_size[:10])}"
            f"{' ...' if len(off_size) > 10 else ''}. Training resizes them (Lanczos, centre crop), which also resizes "
            "the perturbation, so this measures a resized protection; protect images at the interior resolution."
        )
    metadata = [{"file_name": r["file_name"], "text": r["text"]} for r in rows]
    for arm in ARMS:
        write_jsonl_atomic(work / "data" / arm / METADATA, metadata)

    finetunes, tuned = {}, {arm: work / arm / "model" for arm in ARMS}
    if clean_run:
        reused = check_reusable_clean_run(clean_run, configs["clean"])
        say(f"reusing the clean fine-tune {reused}")
        finetunes["clean"] = {**_finetune_record(configs["clean"], reused, None), "reused": True}
        tuned["clean"] = reused / "model"
    for arm in ARMS:
        if arm not in finetunes:
            say(f"fine-tuning on the {arm} images ({len(rows)} images, {section.steps} steps) in {work / arm}")
            finetunes[arm] = _finetune(configs[arm])

    captions_list = [r["text"] for r in rows]
    target = torch.stack(targets)
    scores: dict[str, dict[str, np.ndarray]] = {}
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, directory in (("base", model_dir), ("clean_tuned", tuned["clean"]), ("protected_tuned", tuned["protected"])):
        say(f"sampling {section.samples_per_image} images per caption from the {key.replace('_', '-')} model")
        model = load_diffusion_model(directory, device=str(device))
        raw[key] = _reproduction(model, captions_list, target, section, canvas, border)
        scores[key] = _per_image_scores(*raw[key])
        del model

    similarity = {key: {m: float(v[m].mean()) for m in METRICS} for key, v in scores.items()}
    diffs = {m: scores["clean_tuned"][m] - scores["protected_tuned"][m] for m in METRICS}
    drop = {m: float(diffs[m].mean()) for m in METRICS}
    drop_se = {m: _standard_error(diffs[m]) for m in METRICS}
    gain = {m: similarity["clean_tuned"][m] - similarity["base"][m] for m in METRICS}
    per_image = []
    for i, r in enumerate(rows):
        row = {"file": r["_clean"], "staged": r["file_name"], "caption": r["text"]}
        for key in MODELS:
            row[key] = {m: float(scores[key][m][i]) for m in METRICS}
        per_image.append(row)

    result = {
        "work_dir": str(work),
        "base_config": base[1],
        "images": len(rows),
        "resolution": res,
        "border": border,
        "steps": int(section.steps),
        "seed": int(section.seed),
        "lr": finetunes["clean"]["lr"],
        "samples_per_image": int(section.samples_per_image),
        "sampler": str(section.sampler),
        "sample_steps": int(section.sample_steps),
        "guidance": float(section.guidance),
        "train_overrides": [str(o) for o in section.train_overrides],
        "finetune": finetunes,
        "similarity": similarity,
        "drop": drop,
        "drop_standard_error": drop_se,
        "clean_finetune_gain": gain,
        "warnings": warnings_,
        "per_image": per_image,
    }
    write_json_atomic(work / "mimicry.json", result)
    return result
