"""The protection report (``report.md``) from the ``protection`` summary section."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from eidetic.schema.protect import RANDOM

__all__ = ["render_report", "render_mimicry", "console_summary"]


def render_report(cfg: DictConfig, s: dict) -> str:
    lines = [
        f"# Protection report: {s['objective']}",
        "",
        f"Model: `{s['model']}`. eps = {s['eps']:.5f} ({s['eps_levels']}/255), "
        + ("a random sign of size eps at every pixel (the null control: no PGD)." if s["objective"] == RANDOM else
           f"step {s['step_size']:.5f}, {s['steps']} PGD steps, t in [{s['t_range'][0]}, {s['t_range'][1]}]."),
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
    if "purification" in s:
        lines += render_purification(s)
    if "mimicry" in s:
        if s["mimicry"].get("unpurified", True):
            lines += render_mimicry(s["mimicry"])
        else:
            lines += ["## Mimicry after fine-tuning", "", "Not evaluated on the unpurified copies (`mimicry.unpurified=false`); "
                      "each purification's pair below is compared with the original clean images.", ""]
        for label, m in (s["mimicry"].get("purified") or {}).items():
            lines += [f"### Mimicry after fine-tuning, both sets purified with `{label}`", ""]
            lines += render_mimicry(m)[2:]
    lines += ["## Config", "", "```yaml", OmegaConf.to_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def _pm(value, se, digits, sign=True) -> str:
    text = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return text + (f" ± {se:.{digits}f}" if se is not None else "")


def render_purification(s: dict) -> list[str]:
    """The protection drop without and with each purification, and each purification's cost."""
    pur = s["purification"]
    lines = [
        f"## Purification ({s['evaluated_images']} images)",
        "",
        "Each purification is applied to the clean and to the protected images (the same seeded noise for both) "
        "before SDEdit; both edits are compared with the original clean image. A protection that survives keeps "
        "a positive drop after purification. Cost: PSNR/SSIM of the purified clean image vs the clean image "
        "(what the purification costs a mimic on unprotected images). ± is the standard error over images.",
        "",
        "| purification | settings | cost: PSNR clean (dB) | cost: SSIM clean | PSNR purified protected vs protected (dB) |",
        "|---|---|---|---|---|",
    ]
    for label, p in pur.items():
        c = p["clean_cost"]
        settings = ", ".join(f"{k}={v}" for k, v in p["settings"].items() if k != "kind")
        lines.append(f"| {label} ({p['settings']['kind']}) | {settings} | {_pm(c['psnr_mean'], c['psnr_se'], 2, False)} | "
                     f"{_pm(c['ssim_mean'], c['ssim_se'], 4, False)} | {p['protected_change_psnr_mean']:.2f} |")
    lines += ["", "| strength | purification | SSIM clean edit | SSIM protected edit | SSIM drop | PSNR drop (dB) |", "|---|---|---|---|---|---|"]
    for k, r in s["sdedit"]["by_strength"].items():
        rows = [("none", r)] + [(label, p["sdedit"]["by_strength"][k]) for label, p in pur.items()]
        for label, row in rows:
            lines.append(f"| {k} | {label} | {row['clean_ssim']:.4f} | {row['protected_ssim']:.4f} | "
                         f"{_pm(row['ssim_drop'], row.get('ssim_drop_se'), 4)} | {_pm(row['psnr_drop'], row.get('psnr_drop_se'), 2)} |")
    lines.append("")
    return lines


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
            f"| {arm}{' (reused)' if f.get('reused') else ''} | {num(f['final_loss'], '.4f')} | {num(f['loss_last_quarter_mean'], '.4f')} | "
            f"{f['global_step']} | {num(f['wall_time_s'], '.1f')} | {num(f['total_seconds'], '.1f')} | `{f['run_dir']}` |"
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


def console_summary(out):
    """Protection's essentials: what was protected, how visible it is, and what it did to the model."""
    from pathlib import Path

    from eidetic.io import read_summary

    from .report import Table, essentials

    out = Path(out)
    s = read_summary(out).get("protection")
    if not s:
        return None
    lines = [f"protected {s.get('images_protected', 0)} images ({s.get('objective')}, eps {s.get('eps_levels')}/255, "
             f"{'no PGD' if s.get('objective') == RANDOM else str(s.get('steps')) + ' PGD steps'}) in {s.get('protect_seconds')} s"]
    if s.get("images_failed"):
        lines.append(f"{len(s['images_failed'])} image(s) could not be read (listed in report.md)")
    if "visibility" in s:
        lines.append(f"visibility: PSNR {s['visibility']['psnr_mean']:.2f} dB, SSIM {s['visibility']['ssim_mean']:.4f} (protected vs clean)")
    if "semantic_loss" in s:
        sl = s["semantic_loss"]
        lines.append(f"semantic loss: clean {sl['clean_mean']:.4f} -> protected {sl['protected_mean']:.4f}")
    table = None
    if "sdedit" in s:
        table = Table("SDEdit similarity to the clean image (a positive drop: protection works)",
                      ["strength", "SSIM drop", "PSNR drop", "latent distance increase"],
                      [[k, f"{r['ssim_drop']:+.4f}", f"{r['psnr_drop']:+.2f}", f"{r['latent_distance_increase']:+.4f}"]
                       for k, r in s["sdedit"]["by_strength"].items()])
    if "purification" in s:
        rows = []
        for label, p in s["purification"].items():
            for k, r in p["sdedit"]["by_strength"].items():
                rows.append([label, k, f"{p['clean_cost']['psnr_mean']:.2f}", f"{r['ssim_drop']:+.4f}", f"{s['sdedit']['by_strength'][k]['ssim_drop']:+.4f}"])
        ptable = Table("after purification (cost: PSNR of purified clean vs clean)", ["purification", "strength", "cost PSNR", "SSIM drop", "SSIM drop unpurified"], rows)
        return essentials(f"protection: {out.name}", [table, ptable], lines, [f"report: {out / 'report.md'}", f"protected images: {out}"])
    return essentials(f"protection: {out.name}", [table], lines, [f"report: {out / 'report.md'}", f"protected images: {out}"])
