"""Protect images against diffusion mimicry: ``python protect.py [--config FILE] key=value ...``.

Reads an image folder (optional ``metadata.jsonl`` with ``file_name``/``text`` captions),
attacks a local latent diffusion model (a diffusers Stable Diffusion-style directory) with
the configured objective, and writes to ``output``:

- the protected images as lossless PNG, same size and file stem (``a.jpg`` -> ``a.png``),
- ``metadata.jsonl`` with the captions re-pointed at the PNGs (so the folder is a dataset),
- ``protection_per_image.jsonl`` (per-image metrics), ``report.md``, and the ``protection``
  section of ``summary.json``.

With ``mimicry.enabled=true`` it then fine-tunes the model on the clean and on the protected
copies and compares how well each fine-tuned model reproduces the clean images
(``lightning_modules/mimicry.py``; work files in ``<output>.mimicry/`` by default).

The schema with every key and its default is ``configs/protect.yaml``. A corrupt or
unreadable image is reported and the rest are protected.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from eidetic.config import ConfigError, load_config
from eidetic.imagefolder import load_rgb, read_captions
from eidetic.io import atomic_write, update_summary, write_jsonl_atomic, write_text_atomic
from eidetic import protection as P

SCHEMA = Path(__file__).resolve().parent / "configs" / "protect.yaml"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- config --------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before loading a model; raises ConfigError."""
    errors = []
    for key in ("input", "model", "output"):
        if not cfg[key]:
            errors.append(f"'{key}' is required (e.g. {key}=path/to/dir)")
    if cfg.input and not Path(cfg.input).is_dir():
        errors.append(f"input folder not found: {cfg.input}")
    if cfg.input and cfg.output and Path(cfg.input).resolve() == Path(cfg.output).resolve():
        errors.append("output must differ from input (protected images would overwrite the originals)")
    if cfg.objective not in P.OBJECTIVES:
        errors.append(f"objective must be one of {', '.join(P.OBJECTIVES)}; got {cfg.objective!r}")
    try:
        P.eps_in_levels(cfg.eps)
    except ValueError as exc:
        errors.append(str(exc))
    if not cfg.step_size > 0:
        errors.append(f"step_size must be > 0 (1/255 = {1 / 255:.5f}), got {cfg.step_size}")
    if cfg.steps < 1:
        errors.append(f"steps must be >= 1, got {cfg.steps}")
    tr = list(cfg.t_range)
    if len(tr) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) for t in tr) or not 0 <= tr[0] <= tr[1]:
        errors.append(f"t_range must be [min, max] integers with 0 <= min <= max, got {tr}")
    if cfg.target:
        if cfg.objective not in P.TEXTURAL_OBJECTIVES:
            errors.append(f"target is only used by {', '.join(P.TEXTURAL_OBJECTIVES)}; objective {cfg.objective!r} ignores it (drop target=...)")
        elif not Path(cfg.target).is_file():
            errors.append(f"target image not found: {cfg.target}")
    if cfg.batch_size < 1:
        errors.append(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.dtype not in DTYPES:
        errors.append(f"dtype must be one of {', '.join(DTYPES)}; got {cfg.dtype!r}")
    if not (cfg.device in ("auto", "cpu") or str(cfg.device).startswith("cuda")):
        errors.append(f"device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    ev = cfg.evaluate
    if any(not isinstance(s, (int, float)) or not 0 < s <= 1 for s in ev.strengths):
        errors.append(f"evaluate.strengths must be numbers in (0, 1], got {list(ev.strengths)}")
    if ev.max_images < 0 or ev.steps < 1 or ev.semantic_samples < 1:
        errors.append("evaluate.max_images must be >= 0, evaluate.steps and evaluate.semantic_samples >= 1")
    if cfg.mimicry.enabled:
        errors += check_mimicry_config(cfg)
    if errors:
        raise ConfigError("invalid protect config:\n  " + "\n  ".join(errors))


def mimicry_work_dir(cfg: DictConfig) -> Path:
    from lightning_modules.mimicry import default_work_dir

    return Path(cfg.mimicry.work_dir).resolve() if cfg.mimicry.work_dir else default_work_dir(cfg.output)


def check_mimicry_config(cfg: DictConfig) -> list[str]:
    m, errors = cfg.mimicry, []
    for key in ("steps", "samples_per_image", "sample_steps"):
        if not isinstance(m[key], int) or m[key] < 1:
            errors.append(f"mimicry.{key} must be an integer >= 1, got {m[key]!r}")
    if m.lr is not None and (isinstance(m.lr, bool) or not isinstance(m.lr, (int, float)) or not m.lr > 0):
        errors.append(f"mimicry.lr must be a number > 0, or null for the base training config's train.lr; got {m.lr!r}")
    if m.sampler not in ("ddim", "ddpm"):
        errors.append(f"mimicry.sampler must be ddim or ddpm, got {m.sampler!r}")
    bad = [o for o in m.train_overrides if not isinstance(o, str) or "=" not in o]
    if bad:
        errors.append(f"mimicry.train_overrides must be key=value strings for the training config, got {bad}")
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
def list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    by_output: dict[str, list[str]] = {}
    for p in files:
        by_output.setdefault(p.stem + ".png", []).append(p.name)
    clashes = {k: v for k, v in by_output.items() if len(v) > 1}
    if clashes:
        detail = "; ".join(f"{', '.join(v)} -> {k}" for k, v in clashes.items())
        raise ConfigError(f"these inputs would be written to the same PNG: {detail}. Rename them.")
    return files


def load_image(path: Path) -> torch.Tensor:
    """(3, H, W) in [-1, 1]; EXIF orientation applied so the PNG looks like the original."""
    return torch.from_numpy(load_rgb(path)).permute(2, 0, 1).float() / 127.5 - 1


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = P.to_levels(image).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_write(path, "wb") as fh:
        Image.fromarray(arr).save(fh, format="PNG")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=cpu")
    return torch.device(name)


# ---- the run -------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict:
    from tqdm import tqdm

    check_config(cfg)
    started = time.time()
    src, out = Path(cfg.input), Path(cfg.output)
    captions = read_captions(src, error=ConfigError)
    files = list_images(src)
    if not files:
        raise ConfigError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {src}")
    device = resolve_device(str(cfg.device))
    model = P.load_pipeline_model(cfg.model, device=device, dtype=DTYPES[cfg.dtype])
    t_range = (int(cfg.t_range[0]), int(cfg.t_range[1]))
    if t_range[1] >= model.num_train_timesteps:
        raise ConfigError(f"t_range max {t_range[1]} must be below the model's {model.num_train_timesteps} training timesteps")
    target = load_image(Path(cfg.target)) if cfg.target else None
    if cfg.mimicry.enabled:  # a config that cannot fine-tune fails now, not after the attack
        from lightning_modules import mimicry as M

        work = mimicry_work_dir(cfg)
        base = M.base_config(cfg.model)
        M.check_geometry(M.training_config(cfg.model, work / "data" / "clean", work / "clean", cfg.mimicry, base), cfg.model, base[1])

    images: dict[str, torch.Tensor] = OrderedDict()
    failed: list[dict] = []
    for path in files:
        try:
            images[path.name] = load_image(path)
        except Exception as exc:  # any decoder error: report it, protect the rest
            failed.append({"file": path.name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"protect: skipping {path.name}: cannot read it as an image ({type(exc).__name__}: {exc})", file=sys.stderr)
    if not images:
        raise ConfigError(f"none of the {len(files)} images in {src} could be read: " + "; ".join(f"{f['file']}: {f['error']}" for f in failed))

    # batches of equal-size images, in file order
    groups: dict[tuple[int, int], list[str]] = OrderedDict()
    for name, img in images.items():
        groups.setdefault(tuple(img.shape[-2:]), []).append(name)
    batches = [names[i : i + cfg.batch_size] for names in groups.values() for i in range(0, len(names), cfg.batch_size)]

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

        result = P.protect_images(
            model, batch, cond, cfg.objective, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
            t_range=t_range, target=target, textural_weight=cfg.textural_weight, generator=generator, step_callback=on_step,
        ).cpu()
        for n, img in zip(names, result):
            save_png(img, out / (Path(n).stem + ".png"))
            protected[n] = img
    bar.close()
    protect_seconds = time.time() - started

    if captions:
        rows = [{"file_name": Path(n).stem + ".png", "text": captions[n]} for n in images if n in captions]
        write_jsonl_atomic(out / "metadata.jsonl", rows)

    # check what was saved, not what was computed
    saved = {n: load_image(out / (Path(n).stem + ".png")) for n in protected}
    linf_levels = {n: int((P.to_levels(saved[n]) - P.to_levels(images[n])).abs().max()) for n in saved}
    per_image = {n: {"file": n, "output": Path(n).stem + ".png", "caption": captions.get(n, cfg.caption), "linf_levels": linf_levels[n]} for n in saved}

    evaluation = evaluate(model, cfg, images, saved, captions, groups, per_image, t_range, target) if cfg.evaluate.enabled else {}
    write_jsonl_atomic(out / "protection_per_image.jsonl", list(per_image.values()))

    summary = {
        "objective": cfg.objective,
        "eps": cfg.eps,
        "eps_levels": P.eps_in_levels(cfg.eps),
        "step_size": cfg.step_size,
        "steps": cfg.steps,
        "t_range": list(t_range),
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
        summary["mimicry"] = run_mimicry(cfg, src, out, captions, saved, per_image, device)
        write_jsonl_atomic(out / "protection_per_image.jsonl", list(per_image.values()))
        update_summary(out, "protection", summary)
        write_text_atomic(out / "report.md", render_report(cfg, summary))
    return summary


def run_mimicry(cfg, src: Path, out: Path, captions, saved, per_image, device) -> dict:
    from lightning_modules.data import DataError
    from lightning_modules.mimicry import mimicry_after_finetuning
    from lightning_modules.models import ModelLoadError

    try:
        result = mimicry_after_finetuning(
            cfg.model, src, out, captions, cfg.mimicry, mimicry_work_dir(cfg), files=list(saved), default_caption=cfg.caption,
            device=device, progress=lambda message: print(f"protect: mimicry: {message}", file=sys.stderr),
        )
    except (DataError, ModelLoadError) as exc:
        raise ConfigError(f"mimicry evaluation failed (the protected images and report were written): {exc}") from exc
    for row in result.pop("per_image"):
        per_image[row["file"]]["mimicry"] = {k: row[k] for k in ("base", "clean_tuned", "protected_tuned")}
    return result


@torch.no_grad()
def evaluate(model, cfg, clean_images, saved, captions, groups, per_image, t_range, target) -> dict:
    """Visibility for every image; semantic/textural change and SDEdit for the first max_images."""
    ev = cfg.evaluate
    names = list(saved)
    for n in names:
        sim = P.image_similarity(saved[n][None], clean_images[n][None])
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
    for size_names in groups.values():
        group = [n for n in size_names if n in chosen]
        for i in range(0, len(group), cfg.batch_size):
            batch_names = group[i : i + cfg.batch_size]
            clean = torch.stack([clean_images[n] for n in batch_names])
            prot = torch.stack([saved[n] for n in batch_names])
            caps = [captions.get(n, cfg.caption) for n in batch_names]
            cond = model.encode_prompt(caps)
            # same (t, noise) draws for clean and protected: common random numbers
            seed = int(cfg.seed) + 1
            ls_clean = P.evaluate_semantic_loss(model, clean, cond, ev.semantic_samples, t_range, torch.Generator().manual_seed(seed)).cpu()
            ls_prot = P.evaluate_semantic_loss(model, prot, cond, ev.semantic_samples, t_range, torch.Generator().manual_seed(seed)).cpu()
            shift = P.latent_distance(model, prot, clean)
            for j, n in enumerate(batch_names):
                per_image[n].update(semantic_loss_clean=float(ls_clean[j]), semantic_loss_protected=float(ls_prot[j]), latent_shift=float(shift[j]))
            if cfg.objective in P.TEXTURAL_OBJECTIVES:
                tgt = P.default_target_pattern(*clean.shape[-2:]) if target is None else torch.nn.functional.interpolate(target[None], size=clean.shape[-2:], mode="bilinear", align_corners=False)[0]
                tgt = tgt.expand_as(clean)
                d_clean, d_prot = P.latent_distance(model, clean, tgt), P.latent_distance(model, prot, tgt)
                for j, n in enumerate(batch_names):
                    per_image[n].update(target_distance_clean=float(d_clean[j]), target_distance_protected=float(d_prot[j]))
            for k, s in enumerate(strengths):
                seed = int(cfg.seed) + 100 + k
                edit_clean = P.sdedit(model, clean, caps, s, ev.steps, ev.guidance, torch.Generator().manual_seed(seed)).cpu()
                edit_prot = P.sdedit(model, prot, caps, s, ev.steps, ev.guidance, torch.Generator().manual_seed(seed)).cpu()
                sim_c, sim_p = P.image_similarity(edit_clean, clean), P.image_similarity(edit_prot, clean)
                lat_c, lat_p = P.latent_distance(model, edit_clean, clean), P.latent_distance(model, edit_prot, clean)
                for j, n in enumerate(batch_names):
                    per_image[n][f"sdedit_{s:g}"] = {
                        "clean_ssim": float(sim_c["ssim"][j]), "protected_ssim": float(sim_p["ssim"][j]),
                        "clean_psnr": float(sim_c["psnr"][j]), "protected_psnr": float(sim_p["psnr"][j]),
                        "clean_latent_distance": float(lat_c[j]), "protected_latent_distance": float(lat_p[j]),
                    }
    ev_names = [n for n in names if n in chosen]

    def mean(key, sub=None):
        vals = [per_image[n][sub][key] if sub else per_image[n][key] for n in ev_names]
        return float(np.mean(vals))

    result["evaluated_images"] = len(ev_names)
    result["semantic_loss"] = {"clean_mean": mean("semantic_loss_clean"), "protected_mean": mean("semantic_loss_protected")}
    result["latent_shift_mean"] = mean("latent_shift")
    if cfg.objective in P.TEXTURAL_OBJECTIVES:
        result["target_distance"] = {"clean_mean": mean("target_distance_clean"), "protected_mean": mean("target_distance_protected")}
    sd = {}
    for s in strengths:
        key = f"sdedit_{s:g}"
        row = {m: mean(m, key) for m in per_image[ev_names[0]][key]}
        # protection: how much less the edit of the protected image resembles the clean image
        row["ssim_drop"] = row["clean_ssim"] - row["protected_ssim"]
        row["psnr_drop"] = row["clean_psnr"] - row["protected_psnr"]
        row["latent_distance_increase"] = row["protected_latent_distance"] - row["clean_latent_distance"]
        sd[f"{s:g}"] = row
    result["sdedit"] = {"steps": ev.steps, "guidance": ev.guidance, "by_strength": sd}
    return result


def render_report(cfg: DictConfig, s: dict) -> str:
    lines = [
        f"# Protection report: {s['objective']}",
        "",
        f"Model: `{s['model']}`. eps = {s['eps']:.5f} ({s['eps_levels']}/255), step {s['step_size']:.5f}, "
        f"{s['steps']} PGD steps, t in [{s['t_range'][0]}, {s['t_range'][1]}].",
        f"Protected {s['images_protected']} images in {s['protect_seconds']} s ({s['seconds_per_image']} s/image, "
        f"{s['unet_evals']} UNet evaluations in all). Largest perturbation after saving: {s['max_linf_levels_after_save']}/255.",
        "",
    ]
    if s["images_failed"]:
        lines += ["## Images that could not be read (not protected)", ""]
        lines += [f"- `{f['file']}`: {f['error']}" for f in s["images_failed"]] + [""]
    if "visibility" in s:
        v = s["visibility"]
        lines += ["## Visibility (protected vs clean; higher = less visible)", "", f"PSNR {v['psnr_mean']:.2f} dB, SSIM {v['ssim_mean']:.4f}", ""]
    if "sdedit" in s:
        sl = s["semantic_loss"]
        lines += [
            f"## Effect on the model ({s['evaluated_images']} images)", "",
            f"Semantic (diffusion) loss: clean {sl['clean_mean']:.4f} -> protected {sl['protected_mean']:.4f}. "
            f"Encoder latent shift (mean squared): {s['latent_shift_mean']:.4f}.",
        ]
        if "target_distance" in s:
            td = s["target_distance"]
            lines.append(f"Latent distance to the textural target: clean {td['clean_mean']:.4f} -> protected {td['protected_mean']:.4f}.")
        lines += [
            "",
            f"## SDEdit ({s['sdedit']['steps']} DDIM steps at strength 1, guidance {s['sdedit']['guidance']})",
            "",
            "Similarity of the edit to the clean image. Protection works when the protected image's edit is",
            "less similar (positive drop). The latent distance uses the model's own VAE encoder, the component",
            "the textural objectives attack, so read it beside SSIM/PSNR.",
            "",
            "| strength | SSIM clean edit | SSIM protected edit | SSIM drop | PSNR clean | PSNR protected | PSNR drop | latent dist clean | latent dist protected |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, r in s["sdedit"]["by_strength"].items():
            lines.append(
                f"| {k} | {r['clean_ssim']:.4f} | {r['protected_ssim']:.4f} | {r['ssim_drop']:+.4f} | {r['clean_psnr']:.2f} | "
                f"{r['protected_psnr']:.2f} | {r['psnr_drop']:+.2f} | {r['clean_latent_distance']:.4f} | {r['protected_latent_distance']:.4f} |"
            )
        lines.append("")
    if "mimicry" in s:
        lines += render_mimicry(s["mimicry"])
    lines += ["## Config", "", "```yaml", OmegaConf.to_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def render_mimicry(m: dict) -> list[str]:
    sim, drop, se, k = m["similarity"], m["drop"], m["drop_standard_error"], m["samples_per_image"]

    def pm(key, digits):
        return f"{drop[key]:+.{digits}f}" + (f" ± {se[key]:.{digits}f}" if se[key] is not None else "")

    lines = [
        f"## Mimicry after fine-tuning ({m['images']} images)",
        "",
        f"The model was fine-tuned twice for {m['steps']} steps (seed {m['seed']}, lr {m['lr']:g}; base config "
        f"`{m['base_config']}`), once on the clean and once on the protected images, same captions and settings. "
        f"Each model then drew {k} samples per caption ({m['sampler']}, {m['sample_steps']} steps, guidance {m['guidance']:g}, "
        f"the same seeded noise for every model); the {m['resolution']} px interior inside the {m['border']} px SolidMark "
        "border is compared with the *clean* image. Protection works when the protected-tuned model reproduces the clean "
        "images less well: a positive drop (clean-tuned minus protected-tuned; ± is the standard error over images).",
        "",
        f"| model | SSIM mean | SSIM best of {k} | PSNR mean (dB) | PSNR best of {k} (dB) |",
        "|---|---|---|---|---|",
    ]
    names = {"base": "base (not fine-tuned)", "clean_tuned": "fine-tuned on clean", "protected_tuned": "fine-tuned on protected"}
    for key, label in names.items():
        r = sim[key]
        lines.append(f"| {label} | {r['ssim_mean']:.4f} | {r['ssim_best']:.4f} | {r['psnr_mean']:.2f} | {r['psnr_best']:.2f} |")
    lines.append(f"| **drop** (clean − protected) | {pm('ssim_mean', 4)} | {pm('ssim_best', 4)} | {pm('psnr_mean', 2)} | {pm('psnr_best', 2)} |")
    lines += ["", "| fine-tune | final loss | mean loss, last quarter | steps | fit time (s) | total time (s) | run directory |", "|---|---|---|---|---|---|---|"]
    for arm, f in m["finetune"].items():
        def num(v, fmt):
            return format(v, fmt) if v is not None else "n/a"

        lines.append(
            f"| {arm} | {num(f['final_loss'], '.4f')} | {num(f['loss_last_quarter_mean'], '.4f')} | {f['global_step']} | "
            f"{num(f['wall_time_s'], '.1f')} | {f['total_seconds']:.1f} | `{f['run_dir']}` |"
        )
    gain = m["clean_finetune_gain"]
    lines.append("")
    if gain["ssim_mean"] <= 0 and gain["psnr_mean"] <= 0:
        lines += [
            "**Inconclusive:** the clean-tuned model reproduces the images no better than the untuned one, so this "
            "fine-tune did not learn them and says little about protection. Raise `mimicry.steps` or the learning rate.",
            "",
        ]
    lines += [
        f"Use images at the model's interior resolution ({m['resolution']}x{m['resolution']} px): training resizes other "
        "sizes (Lanczos, centre crop), which also changes the perturbation before the model sees it.",
        "",
    ]
    if m["warnings"]:
        lines += ["Warnings:", ""] + [f"- {w}" for w in m["warnings"]] + [""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Protect images against diffusion mimicry (see configs/protect.yaml).")
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) merged over configs/protect.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. input=DIR model=DIR output=DIR objective=sds-")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, schema=SCHEMA)
        summary = run(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"protect: {exc}", file=sys.stderr)
        return 2
    print(f"protect: wrote {summary['images_protected']} protected images to {cfg.output}"
          + (f"; {len(summary['images_failed'])} unreadable (see report.md)" if summary["images_failed"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
