"""The protection workflow: protect images against diffusion mimicry (``protect.py``).

Reads an image folder (recursively, decoded like training data; optional ``metadata.jsonl``
with ``file_name``/``text`` captions), attacks a local latent diffusion model (a diffusers
Stable Diffusion-style directory) with the configured objective, and writes to ``output``:

- the protected images as lossless PNG at the same relative paths (``a.jpg`` -> ``a.png``),
- ``metadata.jsonl`` with the captions re-pointed at the PNGs (so the folder is a dataset),
- ``protection_per_image.jsonl`` (per-image metrics), ``report.md``, and the ``protection``
  section of ``summary.json``.

With ``mimicry.enabled=true`` it then fine-tunes the model on the clean and on the protected
copies and compares how well each fine-tuned model reproduces the clean images
(:mod:`workflows.mimicry`; work files in ``<output>.mimicry/`` by default). Schema:
:class:`eidetic.schema.protect.ProtectConfig`. A corrupt or unreadable image is reported and
the rest are protected.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from eidetic import protection, purification
from eidetic.config import load
from eidetic.errors import ConfigError, DataError, ModelLoadError
from eidetic.images import IMAGE_EXTENSIONS, decode_image, image_files, read_captions, save_png, to_tensor
from eidetic.io import update_summary, write_jsonl_atomic, write_text_atomic
from eidetic.pipelines import load_diffusion_model
from eidetic.stats import mean_and_standard_error
from eidetic.schema.protect import ProtectConfig

from . import mimicry
from .protect_report import render_report

__all__ = ["Schema", "load_config", "check_config", "run", "evaluate", "done_message"]

Schema = ProtectConfig
DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    return load(Schema, files, overrides)


def check_config(cfg: DictConfig) -> None:
    """What the schema cannot check: the folders and files named exist and do not overlap."""
    errors = []
    if not Path(cfg.input).is_dir():
        errors.append(f"input folder not found: {cfg.input}")
    src, out = Path(cfg.input).resolve(), Path(cfg.output).resolve()
    if src == out:
        errors.append("output must differ from input (protected images would overwrite the originals)")
    elif out.is_relative_to(src):
        errors.append(f"output ({out}) must not be inside input ({src}): input is read recursively, so protected copies would become inputs")
    if cfg.target and not Path(cfg.target).is_file():
        errors.append(f"target image not found: {cfg.target}")
    if cfg.mimicry.enabled:
        errors += check_mimicry_paths(cfg)
    if errors:
        raise ConfigError("invalid protect config:\n  " + "\n  ".join(errors))


def mimicry_work_dir(cfg: DictConfig) -> Path:
    return Path(cfg.mimicry.work_dir).resolve() if cfg.mimicry.work_dir else mimicry.default_work_dir(cfg.output)


def check_mimicry_paths(cfg: DictConfig) -> list[str]:
    errors = []
    if cfg.input and cfg.output:
        work = mimicry_work_dir(cfg)
        for key in ("input", "output"):
            folder = Path(cfg[key]).resolve()
            # both are image folders read recursively by training: staged clean copies or
            # sample grids inside them would become training data
            if work == folder or work.is_relative_to(folder):
                errors.append(f"mimicry.work_dir ({work}) must not be inside {key} ({folder}): it holds clean copies and sample images")
            elif folder.is_relative_to(work):
                errors.append(f"{key} ({folder}) must not be inside mimicry.work_dir ({work}): its sub-folders are replaced on every evaluation")
    return errors


# ---- input folder --------------------------------------------------------------------
def list_images(folder: Path) -> list[str]:
    """Image files below ``folder`` as relative POSIX paths (the training data module reads the same set)."""
    files, _ = image_files(folder)
    names = [p.relative_to(folder).as_posix() for p in files]
    by_output: dict[str, list[str]] = {}
    for n in names:
        by_output.setdefault(output_name(n), []).append(n)
    clashes = {k: v for k, v in by_output.items() if len(v) > 1}
    if clashes:
        detail = "; ".join(f"{', '.join(v)} -> {k}" for k, v in clashes.items())
        raise ConfigError(f"these inputs would be written to the same PNG: {detail}. Rename them.")
    return names


def output_name(name: str) -> str:
    """Where the protected copy of input ``name`` goes: the same relative path, as PNG."""
    return Path(name).with_suffix(".png").as_posix()


def load_image(path: Path) -> torch.Tensor:
    """(3, H, W) in [-1, 1], decoded like training data (EXIF orientation, alpha on white)."""
    return to_tensor(decode_image(path))


def size_batches(images: dict[str, torch.Tensor], batch_size: int) -> list[list[str]]:
    """The names of ``images`` in batches of at most ``batch_size`` equal-size images: grouped by
    size in order of first appearance, each group in the dict's order."""
    groups: dict[tuple[int, int], list[str]] = OrderedDict()
    for name, img in images.items():
        groups.setdefault(tuple(img.shape[-2:]), []).append(name)
    return [names[i : i + batch_size] for names in groups.values() for i in range(0, len(names), batch_size)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=cpu")
    return torch.device(name)


def attack_options(cfg: DictConfig) -> dict:
    """The Diff-Protect choices of the config as :func:`eidetic.protection.protect_images` arguments."""
    start = protection.random_start_default(cfg.objective) if cfg.random_start == "auto" else cfg.random_start == "always"
    rate = float(cfg.target_rate) if cfg.objective == "sdst" and cfg.sdst_weighting == "diff-protect" else None
    return {"sdst_target_rate": rate, "random_start": start, "encoder_latent": str(cfg.encoder_latent)}


# ---- the run -------------------------------------------------------------------------
def run(cfg: DictConfig) -> Path:
    """Protect every image of ``input`` into ``output``; returns ``output`` (its ``summary.json``
    has the ``protection`` section)."""
    from tqdm import tqdm

    check_config(cfg)
    started = time.time()
    src, out = Path(cfg.input), Path(cfg.output)
    captions = read_captions(src, error=ConfigError)
    files = list_images(src)
    if not files:
        raise ConfigError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {src}")
    device = resolve_device(str(cfg.device))
    model = load_diffusion_model(cfg.model, device=device, dtype=DTYPE[cfg.dtype], require_vae=True)
    t_range = (int(cfg.t_range[0]), int(cfg.t_range[1]))
    if t_range[1] >= model.num_train_timesteps:
        raise ConfigError(f"t_range max {t_range[1]} must be below the model's {model.num_train_timesteps} training timesteps")
    late = [f"{p.name or p.kind} (t_star={p.t_star})" for p in cfg.purification if p.kind == "diffpure" and p.t_star >= model.num_train_timesteps]
    if late:
        raise ConfigError(f"purification t_star must be below the model's {model.num_train_timesteps} training timesteps: {', '.join(late)}")
    target = load_image(Path(cfg.target)) if cfg.target else None
    if cfg.mimicry.enabled:  # a config that cannot fine-tune fails now, not after the attack
        work = mimicry_work_dir(cfg)
        base = mimicry.base_config(cfg.model)
        clean_cfg = mimicry.training_config(cfg.model, work / "data" / "clean", work / "clean", cfg.mimicry, base)
        mimicry.check_geometry(clean_cfg, cfg.model, base[1])
        if cfg.mimicry.clean_run:
            mimicry.check_reusable_clean_run(cfg.mimicry.clean_run, clean_cfg, images=False)

    images: dict[str, torch.Tensor] = OrderedDict()
    failed: list[dict] = []
    for name in files:
        try:
            images[name] = load_image(src / name)
        except Exception as exc:  # any decoder error: report it, protect the rest
            failed.append({"file": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"protect: skipping {name}: cannot read it as an image ({type(exc).__name__}: {exc})", file=sys.stderr)
    if not images:
        raise ConfigError(f"none of the {len(files)} images in {src} could be read: " + "; ".join(f"{f['file']}: {f['error']}" for f in failed))

    batches = size_batches(images, cfg.batch_size)

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    protected: dict[str, torch.Tensor] = {}
    bar = tqdm(batches, desc=f"protect {cfg.objective}", unit="batch")
    for names in bar:
        batch = torch.stack([images[n] for n in names])
        caps = [captions.get(n, cfg.caption) for n in names]
        cond = model.encode_prompt(caps)

        def on_step(step, terms, bar=bar):
            bar.set_postfix({"step": f"{step + 1}/{cfg.steps}", **{k: f"{v:.4g}" for k, v in terms.items()}}, refresh=False)

        result = protection.protect_images(
            model, batch, cond, cfg.objective, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
            t_range=t_range, target=target, textural_weight=cfg.textural_weight, generator=generator, step_callback=on_step,
            **attack_options(cfg),
        ).cpu()
        for n, img in zip(names, result):
            save_png(img, out / output_name(n))
            protected[n] = img
    bar.close()
    protect_seconds = time.time() - started

    if captions:
        rows = [{"file_name": output_name(n), "text": captions[n]} for n in images if n in captions]
        write_jsonl_atomic(out / "metadata.jsonl", rows)

    # check what was saved, not what was computed
    saved = {n: load_image(out / output_name(n)) for n in protected}
    linf_levels = {n: int((protection.to_levels(saved[n]) - protection.to_levels(images[n])).abs().max()) for n in saved}
    per_image = {n: {"file": n, "output": output_name(n), "caption": captions.get(n, cfg.caption), "linf_levels": linf_levels[n]} for n in saved}

    evaluation = evaluate(model, cfg, images, saved, captions, per_image, t_range, target) if cfg.evaluate.enabled else {}
    write_jsonl_atomic(out / "protection_per_image.jsonl", list(per_image.values()))

    summary = {
        "objective": cfg.objective,
        "eps": protection.eps_in_levels(cfg.eps) / 255,
        "eps_requested": str(cfg.eps),
        "eps_levels": protection.eps_in_levels(cfg.eps),
        "step_size": cfg.step_size,
        "steps": cfg.steps,
        "t_range": list(t_range),
        "random_start": attack_options(cfg)["random_start"],
        "encoder_latent": str(cfg.encoder_latent),
        "sdst_target_rate": attack_options(cfg)["sdst_target_rate"],
        "model": str(cfg.model),
        "images_protected": len(saved),
        "images_failed": failed,
        "max_linf_levels_after_save": max(linf_levels.values()),
        "protect_seconds": round(protect_seconds, 2),
        "seconds_per_image": round(protect_seconds / len(saved), 3),
        "unet_evals": model.unet_evals,
        **evaluation,
    }
    update_summary(out, "protection", summary)
    write_text_atomic(out / "report.md", render_report(cfg, summary))
    if cfg.mimicry.enabled:
        # after the protection outputs are complete: a failed fine-tune loses nothing above
        summary["mimicry"] = run_mimicry(cfg, src, out, captions, saved, per_image, device, model)
        write_jsonl_atomic(out / "protection_per_image.jsonl", list(per_image.values()))
        update_summary(out, "protection", summary)
        write_text_atomic(out / "report.md", render_report(cfg, summary))
    return out


def run_mimicry(cfg, src: Path, out: Path, captions, saved, per_image, device, model=None) -> dict:
    if not cfg.mimicry.unpurified:
        return {"unpurified": False, "purified": run_purified_mimicry(cfg, src, captions, saved, per_image, device, model,
                                                                      clean_run=cfg.mimicry.clean_run or None)}
    try:
        result = mimicry.mimicry_after_finetuning(
            cfg.model, src, out, captions, cfg.mimicry, mimicry_work_dir(cfg), files=list(saved), default_caption=cfg.caption,
            device=device, progress=lambda message: print(f"protect: mimicry: {message}", file=sys.stderr),
            clean_run=cfg.mimicry.clean_run or None,
        )
    except (DataError, ModelLoadError) as exc:
        raise ConfigError(f"mimicry evaluation failed (the protected images and report were written): {exc}") from exc
    for row in result.pop("per_image"):
        per_image[row["file"]]["mimicry"] = {k: row[k] for k in ("base", "clean_tuned", "protected_tuned")}
    if cfg.purification:
        result["purified"] = run_purified_mimicry(cfg, src, captions, saved, per_image, device, model)
    return result


def run_purified_mimicry(cfg, src: Path, captions, saved, per_image, device, model, clean_run=None) -> dict:
    """Mimicry after fine-tuning on purified clean and purified protected copies, each scored
    against the original clean images; work files in ``<mimicry work dir>/purified-<name>/``.
    ``clean_run``: a finished fine-tune on the same purified clean copies (one purification)."""
    work = mimicry_work_dir(cfg)
    clean = {n: load_image(src / n) for n in saved}
    out = {}
    for index, p in enumerate(cfg.purification):
        label = p.name or p.kind
        folder = work / f"purified-{label}"
        staged = {}
        for arm, images in (("clean", clean), ("protected", saved)):
            purified = purify_all(cfg, p, index, images, captions, model)
            for n, img in purified.items():
                save_png(img, folder / "input" / arm / output_name(n))
            staged[arm] = folder / "input" / arm
        names = [output_name(n) for n in saved]
        caps = {output_name(n): captions.get(n, cfg.caption) for n in saved}
        refs = {output_name(n): src / n for n in saved}
        try:
            result = mimicry.mimicry_after_finetuning(
                cfg.model, staged["clean"], staged["protected"], caps, cfg.mimicry, folder / "runs", files=names,
                default_caption=cfg.caption, device=device, references=refs, clean_run=clean_run,
                progress=lambda message, label=label: print(f"protect: mimicry ({label}): {message}", file=sys.stderr),
            )
        except (DataError, ModelLoadError) as exc:
            raise ConfigError(f"mimicry evaluation after purification {label!r} failed (the protected images and report were written): {exc}") from exc
        by_output = {output_name(n): n for n in saved}
        for row in result.pop("per_image"):
            per_image[by_output[row["file"]]].setdefault("purified", {}).setdefault(label, {})["mimicry"] = {k: row[k] for k in ("base", "clean_tuned", "protected_tuned")}
        out[label] = result
    return out


def purify_all(cfg, p, index: int, images: dict, captions, model) -> dict:
    """Purified copies of ``images`` (name -> (3, H, W)), batched by size; seeded per purification
    and batch so the clean and the protected copy of an image get the same purification noise."""
    out = {}
    for batch_index, chunk in enumerate(size_batches(images, cfg.batch_size)):
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + 7919 * (index + 1) + batch_index)
        result = purification.purify(
            p.kind, torch.stack([images[n] for n in chunk]), quality=p.quality, sigma=p.sigma, factor=p.factor,
            t_star=p.t_star, steps=p.steps, model=model, captions=None, generator=g,
        ).cpu()
        out.update(zip(chunk, result))
    return out


@torch.no_grad()
def evaluate(model, cfg, clean_images, saved, captions, per_image, t_range, target) -> dict:
    """Visibility for every image; semantic/textural change and SDEdit for the first max_images."""
    ev = cfg.evaluate
    names = list(saved)
    for n in names:
        sim = protection.image_similarity(saved[n][None], clean_images[n][None])
        per_image[n]["visibility_psnr"] = float(sim["psnr"][0])
        per_image[n]["visibility_ssim"] = float(sim["ssim"][0])
    result = {
        "visibility": {
            "psnr_mean": float(np.mean([per_image[n]["visibility_psnr"] for n in names])),
            "ssim_mean": float(np.mean([per_image[n]["visibility_ssim"] for n in names])),
        }
    }
    chosen = set(names[: ev.max_images])
    if not chosen:
        return result
    strengths = [float(s) for s in ev.strengths]
    for batch_names in size_batches({n: img for n, img in clean_images.items() if n in chosen}, cfg.batch_size):
        clean = torch.stack([clean_images[n] for n in batch_names])
        prot = torch.stack([saved[n] for n in batch_names])
        caps = [captions.get(n, cfg.caption) for n in batch_names]
        cond = model.encode_prompt(caps)
        # same (t, noise) draws for clean and protected: common random numbers
        seed = int(cfg.seed) + 1
        ls_clean = protection.evaluate_semantic_loss(model, clean, cond, ev.semantic_samples, t_range, torch.Generator().manual_seed(seed)).cpu()
        ls_prot = protection.evaluate_semantic_loss(model, prot, cond, ev.semantic_samples, t_range, torch.Generator().manual_seed(seed)).cpu()
        shift = protection.latent_distance(model, prot, clean)
        for j, n in enumerate(batch_names):
            per_image[n].update(semantic_loss_clean=float(ls_clean[j]), semantic_loss_protected=float(ls_prot[j]), latent_shift=float(shift[j]))
        if cfg.objective in protection.TEXTURAL_OBJECTIVES:
            tgt = protection.default_target_pattern(*clean.shape[-2:]) if target is None else torch.nn.functional.interpolate(target[None], size=clean.shape[-2:], mode="bilinear", align_corners=False)[0]
            tgt = tgt.expand_as(clean)
            d_clean, d_prot = protection.latent_distance(model, clean, tgt), protection.latent_distance(model, prot, tgt)
            for j, n in enumerate(batch_names):
                per_image[n].update(target_distance_clean=float(d_clean[j]), target_distance_protected=float(d_prot[j]))
        for key, row in _sdedit_rows(model, cfg, strengths, clean, prot, clean, caps).items():
            for j, n in enumerate(batch_names):
                per_image[n][key] = row[j]
    ev_names = [n for n in names if n in chosen]

    def mean(key, sub=None):
        vals = [per_image[n][sub][key] if sub else per_image[n][key] for n in ev_names]
        return float(np.mean(vals))

    result["evaluated_images"] = len(ev_names)
    result["semantic_loss"] = {"clean_mean": mean("semantic_loss_clean"), "protected_mean": mean("semantic_loss_protected")}
    result["latent_shift_mean"] = mean("latent_shift")
    if cfg.objective in protection.TEXTURAL_OBJECTIVES:
        result["target_distance"] = {"clean_mean": mean("target_distance_clean"), "protected_mean": mean("target_distance_protected")}
    result["sdedit"] = {"steps": ev.steps, "guidance": ev.guidance, "by_strength": _sdedit_summary([per_image[n] for n in ev_names], strengths)}
    if cfg.purification:
        result["purification"] = evaluate_purified(model, cfg, clean_images, saved, captions, per_image, ev_names, strengths)
    return result


def _sdedit_rows(model, cfg, strengths, clean, prot, reference, caps) -> dict[str, list[dict]]:
    """SDEdit of ``clean`` and ``prot`` at every strength, each edit compared with ``reference``;
    ``sdedit_<s>`` -> one row per image. Clean and protected edits share their noise seed."""
    ev = cfg.evaluate
    rows = {}
    for k, s in enumerate(strengths):
        seed = int(cfg.seed) + 100 + k
        edit_clean = protection.sdedit(model, clean, caps, s, ev.steps, ev.guidance, torch.Generator().manual_seed(seed)).cpu()
        edit_prot = protection.sdedit(model, prot, caps, s, ev.steps, ev.guidance, torch.Generator().manual_seed(seed)).cpu()
        sim_c, sim_p = protection.image_similarity(edit_clean, reference), protection.image_similarity(edit_prot, reference)
        lat_c, lat_p = protection.latent_distance(model, edit_clean, reference), protection.latent_distance(model, edit_prot, reference)
        rows[f"sdedit_{s:g}"] = [{
            "clean_ssim": float(sim_c["ssim"][j]), "protected_ssim": float(sim_p["ssim"][j]),
            "clean_psnr": float(sim_c["psnr"][j]), "protected_psnr": float(sim_p["psnr"][j]),
            "clean_latent_distance": float(lat_c[j]), "protected_latent_distance": float(lat_p[j]),
        } for j in range(clean.shape[0])]
    return rows


def _sdedit_summary(rows: list[dict], strengths) -> dict:
    """Means over images per strength, and the drops with their standard errors over images
    (paired: each image's clean-edit minus protected-edit similarity)."""
    sd = {}
    for s in strengths:
        key = f"sdedit_{s:g}"
        vals = [r[key] for r in rows]
        row = {m: float(np.mean([v[m] for v in vals])) for m in vals[0]}
        for name, (a, b) in {"ssim_drop": ("clean_ssim", "protected_ssim"), "psnr_drop": ("clean_psnr", "protected_psnr"),
                             "latent_distance_increase": ("protected_latent_distance", "clean_latent_distance")}.items():
            mean, se = mean_and_standard_error([v[a] - v[b] for v in vals])
            row[name], row[f"{name}_se"] = mean, se
        sd[f"{s:g}"] = row
    return sd


@torch.no_grad()
def evaluate_purified(model, cfg, clean_images, saved, captions, per_image, ev_names, strengths) -> dict:
    """Each purification applied to the clean and the protected copies of the evaluated images:
    its own cost (purified clean vs clean) and SDEdit of both purified copies vs the clean image."""
    clean = {n: clean_images[n] for n in ev_names}
    prot = {n: saved[n] for n in ev_names}
    out = {}
    for index, p in enumerate(cfg.purification):
        label = p.name or p.kind
        pc = purify_all(cfg, p, index, clean, captions, model)
        pp = purify_all(cfg, p, index, prot, captions, model)
        for n in ev_names:
            cost = protection.image_similarity(pc[n][None], clean[n][None])
            change = protection.image_similarity(pp[n][None], prot[n][None])
            per_image[n].setdefault("purified", {})[label] = {
                "clean_cost_psnr": float(cost["psnr"][0]), "clean_cost_ssim": float(cost["ssim"][0]),
                "protected_change_psnr": float(change["psnr"][0]),
            }
        for chunk in size_batches(clean, cfg.batch_size):
            caps = [captions.get(n, cfg.caption) for n in chunk]
            rows = _sdedit_rows(model, cfg, strengths, torch.stack([pc[n] for n in chunk]), torch.stack([pp[n] for n in chunk]),
                                torch.stack([clean[n] for n in chunk]), caps)
            for key, row in rows.items():
                for j, n in enumerate(chunk):
                    per_image[n]["purified"][label][key] = row[j]
        entries = [per_image[n]["purified"][label] for n in ev_names]
        settings = {"kind": p.kind, **{k: p[k] for k in {"jpeg": ("quality",), "gaussian": ("sigma",), "noisy_upscale": ("sigma", "factor"), "diffpure": ("t_star", "steps")}[p.kind]}}
        psnr, psnr_se = mean_and_standard_error([e["clean_cost_psnr"] for e in entries])
        ssim, ssim_se = mean_and_standard_error([e["clean_cost_ssim"] for e in entries])
        out[label] = {
            "settings": settings,
            "clean_cost": {"psnr_mean": psnr, "psnr_se": psnr_se, "ssim_mean": ssim, "ssim_se": ssim_se},
            "protected_change_psnr_mean": float(np.mean([e["protected_change_psnr"] for e in entries])),
            "sdedit": {"by_strength": _sdedit_summary(entries, strengths)},
        }
    return out


def console_summary(path: Path):
    from .protect_report import console_summary as summary

    return summary(path)


def done_message(path: Path) -> str:
    from eidetic.io import read_summary

    s = read_summary(path).get("protection", {})
    failed = s.get("images_failed") or []
    return f"protect: wrote {s.get('images_protected', 0)} protected images to {path}" + (
        f"; {len(failed)} unreadable (see report.md)" if failed else "")
