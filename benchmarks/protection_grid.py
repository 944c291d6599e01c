"""Every protection objective at several budgets against SDEdit (with and without purification)
and against mimicry by fine-tuning.

    python benchmarks/protection_grid.py --train-base [--out DIR]          # trains the default model first
    python benchmarks/protection_grid.py --model RUN/model [--objectives sds- photoguard] [--eps 8 16 32]
    python benchmarks/protection_grid.py --model RUN/model --seed 0 1            # two PGD seeds, pooled
    python benchmarks/protection_grid.py --model RUN/model --mimicry-seeds 0 1   # also fine-tunes on every cell

``--images`` crops of the scikit-image photographs that the default data set does not contain
(as in ``protection_mimicry.py``) are protected by ``protect.py`` with every objective at every
ε (in 8-bit levels), plus a positive control (``--control``, default photoguard at 64/255: an
encoder attack with a budget large enough that it must change what SDEdit returns if the
evaluation can see protection at all). Each cell is then edited by SDEdit at several strengths,
unpurified and after each purification (JPEG 75, Gaussian noise, noisy upscaling, DiffPure with
the target model), and compared with the clean image. The drop is clean-edit minus
protected-edit PSNR, paired per image, with a 95 % t interval over images; positive means the
protection works. At low strength an edit keeps much of its input, so part of any drop there is
the perturbation itself: read the visibility column beside it. With several PGD seeds (``--seed
0 1``) every cell is protected and edited once per seed (the seed also draws the SDEdit noise);
the table shows each image's drop averaged over the seeds, with its t interval over images, and
each seed's unpurified drop beside it.

With ``--mimicry-seeds``, every cell is also evaluated against mimicry (``protect.py``
``mimicry.enabled=true``): the model is fine-tuned on the protected images once per seed, and
the clean fine-tune of that seed is shared by every cell (``mimicry.clean_run``); the drop is
clean-tuned minus protected-tuned similarity of generations to the clean images (PSNR and
SSIM, best of ``--samples`` per caption), per seed with a t interval over images, and pooled
(each image's drop averaged over the seeds, t interval over images).

A cell whose ``summary.json`` exists is kept (rerun the same command to resume). Writes
``OUT/grid.md``, ``OUT/grid.json`` and ``OUT/grid.png`` (and ``OUT/mimicry.md``, ``.json``,
``.png``; ``OUT/mimicry-PURIFICATION.png``); the last line is JSON with the
positive control's drop at the middle strength, each objective's drop at 16/255, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eidetic.schema.protect import OBJECTIVES, RANDOM, SEMANTIC_OBJECTIVES, TEXTURAL_OBJECTIVES  # noqa: E402

# the same settings before SDEdit and before fine-tuning
PURIFICATION_SETTINGS = {"jpeg": "{kind: jpeg, quality: 75}", "gaussian": "{kind: gaussian, sigma: 0.05}",
                         "noisy_upscale": "{kind: noisy_upscale, sigma: 0.02, factor: 2}", "diffpure": "{kind: diffpure, t_star: 100, steps: 10}"}
PURIFICATIONS = "[" + ", ".join(PURIFICATION_SETTINGS.values()) + "]"
MIMICRY_FIGURE_METRICS = (("psnr_best", "PSNR-best drop (dB)"), ("ssim_best", "SSIM-best drop"))


def run_cell(model: Path, clean: Path, out: Path, objective: str, levels: int, pgd_seed: int, args) -> dict:
    import protect

    summary = out / "summary.json"
    if not summary.is_file():
        rc = protect.main([
            f"input={clean}", f"model={model}", f"output={out}", f"objective={objective}", f"eps={levels}/255",
            f"steps={args.pgd_steps}", f"seed={pgd_seed}", f"evaluate.strengths=[{','.join(map(str, args.strengths))}]",
            f"evaluate.max_images={args.images}", f"purification={PURIFICATIONS if args.purify else '[]'}",
        ])
        if rc != 0:
            raise SystemExit(f"protect.py failed on {objective} at {levels}/255 (exit {rc})")
    return json.loads(summary.read_text())["protection"]


def write_drops_figure(path: Path, rows: list[dict], metrics: tuple, title: str) -> None:
    """The drops of ``rows`` with their intervals as a PNG (nothing when there is nothing to draw)."""
    from eidetic.figures import figure_png, protection_drops
    from eidetic.io import atomic_write

    fig = protection_drops(rows, metrics, title)
    if fig is not None:
        with atomic_write(path, "wb") as fh:
            fh.write(figure_png(fig, dpi=110))


def sdedit_cell_dir(out: Path, pgd_seed: int, objective: str, levels: int) -> Path:
    return out / f"pgd-seed{pgd_seed}" / f"{objective}-eps{levels}"


def mimicry_cell_dir(seed_dir: Path, objective: str, levels: int, purification: str | None = None) -> Path:
    return seed_dir / f"{objective}-eps{levels}{f'-purified-{purification}' if purification else ''}"


def mimicry_cell_finished(out: Path) -> bool:
    summary = out / "summary.json"
    return summary.is_file() and "mimicry" in json.loads(summary.read_text()).get("protection", {})


def run_mimicry_cell(model: Path, clean: Path, out: Path, objective: str, levels: int, seed: int, clean_run: Path | None, args,
                     purification: str | None = None) -> dict:
    """One cell fine-tuned on (protection as in ``run_cell``, no SDEdit); returns its mimicry section.
    With ``purification``: both sets are purified before fine-tuning and only that pair is fine-tuned
    (``mimicry.unpurified=false``); ``clean_run`` is then the seed's fine-tune on purified clean copies."""
    import protect

    summary = out / "summary.json"
    if not mimicry_cell_finished(out):
        purify = [f"purification=[{PURIFICATION_SETTINGS[purification]}]", "mimicry.unpurified=false"] if purification else ["purification=[]"]
        rc = protect.main([
            f"input={clean}", f"model={model}", f"output={out}", f"objective={objective}", f"eps={levels}/255",
            f"steps={args.pgd_steps}", f"seed={args.seeds[0]}", "evaluate.enabled=false", *purify, "mimicry.enabled=true",
            f"mimicry.seed={seed}", f"mimicry.steps={args.finetune_steps}", f"mimicry.samples_per_image={args.samples}",
            *([f"mimicry.clean_run={clean_run}"] if clean_run else []),
            *([f"mimicry.train_overrides=[{','.join(args.finetune_overrides)}]"] if args.finetune_overrides else []),
        ])
        if rc != 0:
            raise SystemExit(f"protect.py failed on {objective} at {levels}/255 with mimicry seed {seed}"
                             f"{f' after {purification}' if purification else ''} (exit {rc})")
    return json.loads(summary.read_text())["protection"]["mimicry"]


def mimicry_section(section: dict, purification: str | None = None) -> dict:
    """The mimicry result of the unpurified pair, or of the pair purified with ``purification``."""
    return section["purified"][purification] if purification else section


def mimicry_per_image(out: Path, purification: str | None = None) -> list[dict]:
    """A cell's per-image rows as ``{"file", "mimicry"}``, the mimicry scores of the unpurified or the purified pair."""
    rows = [json.loads(line) for line in (out / "protection_per_image.jsonl").read_text().splitlines() if line.strip()]
    return [{"file": r["file"], "mimicry": r["purified"][purification]["mimicry"] if purification else r["mimicry"]} for r in rows]


def interval_text(mean: float, ci, digits: int = 2) -> str:
    """``+m [lo, hi]``, bold when the interval excludes 0 on either side (a perturbation that makes
    mimicry easier is a finding too); just ``+m`` without an interval."""
    lo, hi = ci if ci is not None else (None, None)
    if lo is None:
        return f"{mean:+.{digits}f}"
    mark = "**" if lo > 0 or hi < 0 else ""
    return f"{mark}{mean:+.{digits}f}{mark} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def finished_clean_run(folder: Path, cells, purification: str | None = None) -> Path | None:
    """The clean fine-tune (on copies purified with ``purification``, if given) of a finished cell
    of this seed, so a resumed grid does not fine-tune on the clean images again whichever of its
    cells happens to come first."""
    for objective, levels in cells:
        summary = mimicry_cell_dir(folder, objective, levels, purification) / "summary.json"
        if summary.is_file():
            section = json.loads(summary.read_text()).get("protection", {}).get("mimicry")
            finetune = mimicry_section(section, purification).get("finetune", {}) if section else {}
            if "clean" in finetune:
                return Path(finetune["clean"]["run_dir"])
    return None


MIMICRY_MEASURES = ("psnr_best", "ssim_best", "psnr_mean", "ssim_mean")


def mean_interval(values) -> tuple[float, list | None]:
    """Mean and 95 % t interval over images of per-image values (None without two images)."""
    from eidetic.stats import mean_and_standard_error, t_interval

    values = [float(v) for v in values]
    mean, se = mean_and_standard_error(values)
    ci = t_interval(mean, se, len(values))
    return mean, None if ci is None else list(ci)


def seed_pooled_interval(per_seed: list) -> tuple[float, list | None]:
    """``mean_interval`` of per-image values averaged over seeds first (``per_seed``: one array of
    per-image values per seed, in the same image order)."""
    import numpy as np

    return mean_interval(np.mean(per_seed, axis=0))


def mimicry_drops(rows: list[dict], measure: str):
    """Per image (in file order), clean-tuned minus protected-tuned ``measure`` of one mimicry cell and seed."""
    import numpy as np

    rows = sorted(rows, key=lambda r: r["file"])
    return np.array([r["mimicry"]["clean_tuned"][measure] - r["mimicry"]["protected_tuned"][measure] for r in rows])


def null_difference_rows(per_cell: dict, null: str = RANDOM) -> list[dict]:
    """Each objective's mimicry drop minus the null perturbation's at the same ε, paired per image
    (each image's difference averaged over the fine-tuning seeds both ran), t interval over images:
    whether an objective protects more than noise of its budget does."""
    out = []
    for (objective, levels), by_seed in per_cell.items():
        if objective == null or (null, levels) not in per_cell:
            continue
        seeds = sorted(set(by_seed) & set(per_cell[(null, levels)]))
        row = {"objective": objective, "eps_levels": levels, "null": null, "seeds": seeds}
        row["images"] = len(by_seed[seeds[0]])
        for m in ("psnr_best", "ssim_best"):
            row[m], row[f"{m}_ci"] = seed_pooled_interval([mimicry_drops(by_seed[s], m) - mimicry_drops(per_cell[(null, levels)][s], m) for s in seeds])
        out.append(row)
    return out


def best_cells(r: dict) -> str:
    """A row's PSNR-best and SSIM-best values with their intervals, as two table cells."""
    return " | ".join(interval_text(r[m], r[f"{m}_ci"], digits) for m, digits in (("psnr_best", 2), ("ssim_best", 3)))


def budget_effect_rows(per_cell: dict) -> list[dict]:
    """For each objective run at several ε: the mimicry drop at each budget minus the drop at the next
    smaller one, paired per image (each image's difference averaged over the fine-tuning seeds both
    ran), t interval over images: whether a larger budget protects more."""
    out = []
    for objective in dict.fromkeys(o for o, _ in per_cell):
        budgets = sorted(e for o, e in per_cell if o == objective)
        for low, high in zip(budgets, budgets[1:]):
            a, b = per_cell[(objective, low)], per_cell[(objective, high)]
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            row = {"objective": objective, "from_levels": low, "to_levels": high, "seeds": seeds, "images": len(b[seeds[0]])}
            for m in ("psnr_best", "ssim_best"):
                row[m], row[f"{m}_ci"] = seed_pooled_interval([mimicry_drops(b[s], m) - mimicry_drops(a[s], m) for s in seeds])
            out.append(row)
    return out


def budget_effect_table(rows: list[dict]) -> str:
    lines = [f"Larger budget minus smaller, paired per image over fine-tuning seeds {', '.join(map(str, rows[0]['seeds']))}: "
             f"difference of the mimicry drops, mean [95 % t interval over {rows[0]['images']} images]; positive: the larger "
             "budget protects more; bold: the interval excludes 0.",
             "", "| objective | ε | PSNR best | SSIM best |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['to_levels']}/255 minus {r['from_levels']}/255 | " + best_cells(r) + " |")
    return "\n".join(lines)


def null_table(rows: list[dict]) -> str:
    lines = [f"Drop minus the null perturbation's ({rows[0]['null']}, same ε), paired per image over fine-tuning seeds "
             f"{', '.join(map(str, rows[0]['seeds']))}, mean [95 % t interval over {rows[0]['images']} images]; bold: the interval excludes 0.",
             "", "| objective | ε | PSNR best | SSIM best |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['eps_levels']}/255 | " + best_cells(r) + " |")
    return "\n".join(lines)


def purification_effect_rows(per_cell: dict, purified_cell: dict, purification: str) -> list[dict]:
    """What purifying both sets before fine-tuning does, paired per image (each image's value
    averaged over the fine-tuning seeds both ran), t interval over images: per cell, the mimicry
    drop after purification minus the drop without (negative: the purification removes
    protection); and, as cell "clean", the purification's own cost to a mimic of clean images
    (clean-tuned minus purified-clean-tuned similarity to the clean images)."""
    import numpy as np

    def clean_tuned(rows, m):
        return np.array([r["mimicry"]["clean_tuned"][m] for r in sorted(rows, key=lambda r: r["file"])])

    out, cost_seeds = [], {}
    for cell, after in purified_cell.items():
        seeds = sorted(set(after) & set(per_cell.get(cell, {})))
        if not seeds:
            continue
        row = {"objective": cell[0], "eps_levels": cell[1], "purification": purification, "seeds": seeds, "images": len(after[seeds[0]])}
        for m in ("psnr_best", "ssim_best"):
            row[m], row[f"{m}_ci"] = seed_pooled_interval([mimicry_drops(after[s], m) - mimicry_drops(per_cell[cell][s], m) for s in seeds])
        out.append(row)
        for s in seeds:
            cost_seeds.setdefault(s, (per_cell[cell][s], after[s]))
    if cost_seeds:
        seeds = sorted(cost_seeds)
        row = {"objective": "clean", "eps_levels": 0, "purification": purification, "seeds": seeds, "images": len(cost_seeds[seeds[0]][0])}
        for m in ("psnr_best", "ssim_best"):
            row[m], row[f"{m}_ci"] = seed_pooled_interval([clean_tuned(before, m) - clean_tuned(after, m) for before, after in cost_seeds.values()])
        out.append(row)
    return out


def purification_effect_table(rows: list[dict]) -> str:
    purification, n = rows[0]["purification"], rows[0]["images"]
    lines = [f"Purification `{purification}` of both sets before fine-tuning, paired per image over fine-tuning seeds "
             f"{', '.join(map(str, rows[0]['seeds']))}, mean [95 % t interval over {n} images]; bold: the interval excludes 0. "
             "Cells: mimicry drop after purification minus the drop without (negative: the purification removes protection). "
             "clean: what the purification costs a mimic of clean images (clean-tuned minus purified-clean-tuned similarity).",
             "", "| cell | PSNR best | SSIM best |", "|---|---|---|"]
    for r in rows:
        name = "clean (the purification's cost)" if r["objective"] == "clean" else f"{r['objective']} {r['eps_levels']}/255"
        lines.append(f"| {name} | " + best_cells(r) + " |")
    return "\n".join(lines)


def mimicry_rows(per_image: dict[int, list[dict]], objective: str, levels: int) -> list[dict]:
    """Drops per seed and pooled over seeds (each image's drop averaged over them), with t
    intervals over images; ``per_image[seed]`` are the protect run's per-image mimicry rows."""
    import numpy as np

    out = []
    seeds = sorted(per_image)
    for label, by_seed in [*((str(s), [per_image[s]]) for s in seeds), ("pooled", [per_image[s] for s in seeds])]:
        row = {"objective": objective, "eps_levels": levels, "seeds": label, "images": len(by_seed[0])}
        for m in MIMICRY_MEASURES:
            row[m], row[f"{m}_ci"] = seed_pooled_interval([mimicry_drops(rows, m) for rows in by_seed])
        if label != "pooled":
            row["clean_gain_psnr_best"] = float(np.mean([r["mimicry"]["clean_tuned"]["psnr_best"] - r["mimicry"]["base"]["psnr_best"]
                                                         for r in by_seed[0]]))
        out.append(row)
    return out


def mimicry_table(rows: list[dict], n: int, steps: int, purification: str | None = None) -> str:
    seeds = list(dict.fromkeys(r["seeds"] for r in rows))
    cells = sorted({(r["objective"], r["eps_levels"]) for r in rows}, key=lambda c: (c[1], c[0]))
    by = {(r["objective"], r["eps_levels"], r["seeds"]): r for r in rows}

    def cell(r, m):
        return interval_text(r[m], r[f"{m}_ci"], 2 if m.startswith("psnr") else 3)

    head = ["objective", "ε"] + [f"{m.replace('_', ' ')} drop, seed {s}" for s in seeds for m in ("psnr_best", "ssim_best")]
    purified = f", both sets purified with `{purification}` first" if purification else ""
    lines = [f"Mimicry after fine-tuning ({steps} steps on the {n} protected images{purified}, one fine-tune per seed; the clean fine-tune of "
             "each seed shared by every cell): clean-tuned minus protected-tuned similarity of the best of the samples to the clean "
             f"image, mean [95 % t interval over {n} images]; pooled: each image's drop averaged over the seeds first. Bold: the "
             "interval excludes 0.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective, levels in cells:
        lines.append(f"| {objective} | {levels}/255 | " + " | ".join(cell(by[(objective, levels, s)], m) for s in seeds
                                                                  for m in ("psnr_best", "ssim_best")) + " |")
    gains = [r["clean_gain_psnr_best"] for r in rows if "clean_gain_psnr_best" in r]
    if gains:
        lines += ["", f"Clean fine-tune's own gain over the untuned model (PSNR best of samples): {min(gains):+.2f} to {max(gains):+.2f} dB "
                  "(what there is to protect against)."]
    return "\n".join(lines)


def edit_drops(rows: list[dict], key: str, metric: str = "psnr", pick=lambda r: r):
    """Per image, clean-edit minus protected-edit ``metric`` of the SDEdit result ``key``
    (``pick`` selects a purified arm of the row)."""
    import numpy as np

    return np.array([pick(r)[key][f"clean_{metric}"] - pick(r)[key][f"protected_{metric}"] for r in rows])


def sdedit_rows(per_image: dict[int, list[dict]], objective: str, levels: int) -> list[dict]:
    """One row per (PGD seed or "pooled", purification, strength): the SDEdit PSNR and SSIM drops
    (clean edit minus protected edit, paired per image) with t intervals over images; pooled
    averages each image's drop over the seeds first. ``per_image[seed]`` are the protect run's
    per-image rows (only the evaluated images carry SDEdit results)."""
    import numpy as np

    seeds = sorted(per_image)
    evaluated = {s: [r for r in per_image[s] if any(k.startswith("sdedit_") for k in r)] for s in seeds}
    first = evaluated[seeds[0]]
    threats = {"none": lambda r: r, **{label: (lambda r, label=label: r["purified"][label]) for label in first[0].get("purified", {})}}
    strengths = sorted(float(k.removeprefix("sdedit_")) for k in first[0] if k.startswith("sdedit_"))

    labels = [(str(s), [evaluated[s]]) for s in seeds] + ([("pooled", [evaluated[s] for s in seeds])] if len(seeds) > 1 else [])
    rows = []
    for label, by_seed in labels:
        visibility = float(np.mean([r["visibility_psnr"] for rows_ in by_seed for r in rows_]))
        for purification, pick in threats.items():
            for strength in strengths:
                row = {"objective": objective, "eps_levels": levels, "seeds": label, "purification": purification,
                       "strength": strength, "images": len(by_seed[0]), "visibility_psnr": visibility}
                for metric in ("psnr", "ssim"):
                    row[f"{metric}_drop"], row[f"{metric}_drop_ci"] = seed_pooled_interval(
                        [edit_drops(rows_, f"sdedit_{strength:g}", metric, pick) for rows_ in by_seed])
                rows.append(row)
    return rows


ENCODER_ONLY = tuple(o for o in TEXTURAL_OBJECTIVES if o not in SEMANTIC_OBJECTIVES)  # photoguard
DENOISER_ONLY = tuple(o for o in SEMANTIC_OBJECTIVES if o not in TEXTURAL_OBJECTIVES)  # advdm±, sds±


def encoder_vs_denoiser_rows(per_cell: dict, strength: float) -> list[dict]:
    """Xue et al.'s "the encoder is the weak point", paired per image: for each ε, the unpurified
    SDEdit PSNR drop of each encoder-only objective minus that of each denoiser-only one, each
    image's drop averaged over the PGD seeds first, with a t interval over images (positive: the
    encoder attack protects more). ``per_cell[(objective, levels)][seed]`` are per-image rows."""
    import numpy as np

    def drops(objective, levels):
        key = f"sdedit_{strength:g}"
        return np.mean([edit_drops([r for r in rows if key in r], key) for rows in per_cell[(objective, levels)].values()], axis=0)

    out = []
    for levels in sorted({e for _, e in per_cell}):
        for enc in (o for o in ENCODER_ONLY if (o, levels) in per_cell):
            for den in (o for o in DENOISER_ONLY if (o, levels) in per_cell):
                d = drops(enc, levels) - drops(den, levels)
                mean, ci = mean_interval(d)
                out.append({"encoder": enc, "denoiser": den, "eps_levels": levels, "strength": strength, "images": len(d),
                            "psnr_drop_difference": mean, "psnr_drop_difference_ci": ci})
    return out


def encoder_table(rows: list[dict]) -> str:
    lines = ["Encoder-only minus denoiser-only objective, paired per image: difference of the unpurified SDEdit PSNR drops "
             f"(dB) at strength {rows[0]['strength']:g}, mean [95 % t interval over {rows[0]['images']} images]; positive: the "
             "encoder attack protects more; bold: the interval excludes 0.", "",
             "| ε | encoder | denoiser | difference |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['eps_levels']}/255 | {r['encoder']} | {r['denoiser']} | "
                     f"{interval_text(r['psnr_drop_difference'], r['psnr_drop_difference_ci'])} |")
    return "\n".join(lines)


def shown_seeds(seeds: list) -> str:
    """Which rows a table, figure or summary line reads: pooled over several seeds, else the one seed's."""
    return "pooled" if len(seeds) > 1 else str(seeds[0])


def _cell(r: dict | None) -> str:
    return "" if r is None else interval_text(r["psnr_drop"], r["psnr_drop_ci"])


def table(rows: list[dict], strength: float, n: int, costs: dict) -> str:
    """The grid at one strength; with several PGD seeds the pooled drops, and each seed's
    unpurified drop beside them."""
    seeds = [s for s in dict.fromkeys(r["seeds"] for r in rows) if s != "pooled"]
    shown = shown_seeds(seeds)
    purifications = list(dict.fromkeys(r["purification"] for r in rows))
    cells = sorted({(r["objective"], r["eps_levels"]) for r in rows}, key=lambda c: (c[1], c[0]))
    by = {(r["objective"], r["eps_levels"], r["seeds"], r["purification"], r["strength"]): r for r in rows}
    head = ["objective", "ε", "visibility PSNR"] + [f"drop, {p}" for p in purifications]
    if shown == "pooled":
        head.append("drop, none, per seed")
        what = (f"pooled over PGD seeds {', '.join(seeds)} (each image's drop averaged over the seeds first; "
                "each seed also changes the SDEdit noise), ")
    else:
        what = f"PGD seed {shown}, "
    lines = [f"SDEdit at strength {strength:g}: clean-edit minus protected-edit PSNR (dB) vs the clean image, {what}mean "
             f"[95 % t interval] over {n} images; bold: the interval excludes 0.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective, levels in cells:
        base = by[(objective, levels, shown, "none", strength)]
        cols = [_cell(by.get((objective, levels, shown, p, strength))) for p in purifications]
        if shown == "pooled":
            cols.append(" / ".join(f"{by[(objective, levels, s, 'none', strength)]['psnr_drop']:+.2f}" for s in seeds))
        lines.append(f"| {objective} | {levels}/255 | {base['visibility_psnr']:.1f} | " + " | ".join(cols) + " |")
    if costs:
        lines += ["", "Purification's own cost on clean images (PSNR of purified vs clean, mean ± s.e.): "
                  + "; ".join(f"{k} {v['psnr_mean']:.1f} ± {v['psnr_se']:.1f} dB" for k, v in costs.items())]
    return "\n".join(lines)


def sdedit_grid(args, model: Path, clean: Path, cells: list, unfinished: list) -> dict:
    """Runs every SDEdit cell for every PGD seed (or, with ``--tabulate-only``, reads the cells
    finished for every seed and names the others in ``unfinished``); writes ``grid.md``,
    ``grid.json`` and ``grid.png``; returns the SDEdit part of the summary line."""
    from eidetic.io import write_json_atomic, write_text_atomic

    rows, costs, sdedit_per_image = [], {}, {}
    for i, (objective, levels) in enumerate(cells):
        if args.tabulate_only and not all((sdedit_cell_dir(args.out, s, objective, levels) / "summary.json").is_file() for s in args.seeds):
            unfinished.append(f"{objective}:{levels} (SDEdit)")
            continue
        by_seed = {}
        for seed in args.seeds:
            print(f"[{i + 1}/{len(cells)}] {objective} at {levels}/255, PGD seed {seed}", file=sys.stderr, flush=True)
            cell_out = sdedit_cell_dir(args.out, seed, objective, levels)
            section = run_cell(model, clean, cell_out, objective, levels, seed, args)
            by_seed[seed] = [json.loads(line) for line in (cell_out / "protection_per_image.jsonl").read_text().splitlines() if line.strip()]
            for label, p in section.get("purification", {}).items():
                costs.setdefault(label, p["clean_cost"])
        rows += sdedit_rows(by_seed, objective, levels)
        sdedit_per_image[(objective, levels)] = by_seed
    if not rows:
        return {}
    middle = sorted(args.strengths)[len(args.strengths) // 2]
    text = table(rows, middle, args.images, costs)
    encoder_rows = encoder_vs_denoiser_rows(sdedit_per_image, middle)
    if encoder_rows:
        text += "\n\n" + encoder_table(encoder_rows)
    write_text_atomic(args.out / "grid.md", text + "\n")
    write_json_atomic(args.out / "grid.json", {"images": args.images, "pgd_steps": args.pgd_steps, "pgd_seeds": args.seeds,
                                               "rows": rows, "purification_cost": costs, "encoder_vs_denoiser": encoder_rows})
    print(text)
    shown = shown_seeds(args.seeds)
    pick = {(r["objective"], r["eps_levels"]): r for r in rows
            if r["seeds"] == shown and r["purification"] == "none" and r["strength"] == middle}
    write_drops_figure(args.out / "grid.png", list(pick.values()), (("psnr_drop", "SDEdit PSNR drop (dB)"),),
                       f"SDEdit at strength {middle:g}, unpurified: clean-edit minus protected-edit PSNR, {args.images} images, "
                       f"PGD seeds {', '.join(map(str, args.seeds))} ({shown}); mean and 95 % t interval over images")
    return {
        "strength": middle, "pgd_seeds": args.seeds,
        "positive_control": None if not args.control or cells[-1] not in pick else {
            "cell": args.control, "psnr_drop": pick[cells[-1]]["psnr_drop"], "psnr_drop_ci": pick[cells[-1]]["psnr_drop_ci"]},
        "psnr_drop_at_16": {o: round(pick[(o, 16)]["psnr_drop"], 3) for o in args.objectives if (o, 16) in pick},
        "encoder_minus_denoiser_at_16": {f"{r['encoder']}-{r['denoiser']}": [round(r["psnr_drop_difference"], 3), r["psnr_drop_difference_ci"]]
                                         for r in encoder_rows if r["eps_levels"] == 16},
    }


def mimicry_grid(args, model: Path, clean: Path, cells: list, unfinished: list) -> dict:
    """Runs every mimicry cell for every fine-tuning seed, unpurified and after each
    ``--mimicry-purify`` (or, with ``--tabulate-only``, reads the finished ones and names the
    others in ``unfinished``); writes ``mimicry.md``, ``mimicry.json`` and the figures; returns
    the mimicry part of the summary line."""
    from eidetic.io import write_json_atomic, write_text_atomic

    per_cell: dict = {p: {} for p in (None, *args.mimicry_purify)}  # purification -> (objective, levels) -> seed -> rows
    for purification in per_cell:
        mimicry_cells = cells
        if args.tabulate_only:
            done = {c: all(mimicry_cell_finished(mimicry_cell_dir(args.out / f"mimicry-seed{s}", *c, purification)) for s in args.mimicry_seeds)
                    for c in cells}
            mimicry_cells = [c for c in cells if done[c]]
            unfinished += [f"{o}:{e} (mimicry{f' after {purification}' if purification else ''})" for (o, e) in cells if not done[(o, e)]]
        for seed in args.mimicry_seeds:
            seed_dir = args.out / f"mimicry-seed{seed}"
            clean_run = finished_clean_run(seed_dir, cells, purification)
            for i, (objective, levels) in enumerate(mimicry_cells):
                print(f"[mimicry seed {seed}{f', purified with {purification}' if purification else ''}: {i + 1}/{len(mimicry_cells)}] "
                      f"{objective} at {levels}/255", file=sys.stderr, flush=True)
                cell_out = mimicry_cell_dir(seed_dir, objective, levels, purification)
                section = run_mimicry_cell(model, clean, cell_out, objective, levels, seed, clean_run, args, purification)
                clean_run = clean_run or Path(mimicry_section(section, purification)["finetune"]["clean"]["run_dir"])
                per_cell[purification].setdefault((objective, levels), {})[seed] = mimicry_per_image(cell_out, purification)
    mrows = [r for (objective, levels), by_seed in per_cell[None].items() for r in mimicry_rows(by_seed, objective, levels)]
    nrows, brows = null_difference_rows(per_cell[None]), budget_effect_rows(per_cell[None])
    sections = [mimicry_table(mrows, args.images, args.finetune_steps) if mrows else "", null_table(nrows) if nrows else "",
                budget_effect_table(brows) if brows else ""]
    purified = {}
    for purification in args.mimicry_purify:
        prows = [r for (objective, levels), by_seed in per_cell[purification].items() for r in mimicry_rows(by_seed, objective, levels)]
        pnull, effect = null_difference_rows(per_cell[purification]), purification_effect_rows(per_cell[None], per_cell[purification], purification)
        sections += [mimicry_table(prows, args.images, args.finetune_steps, purification) if prows else "",
                     null_table(pnull) if pnull else "", purification_effect_table(effect) if effect else ""]
        purified[purification] = {"settings": PURIFICATION_SETTINGS[purification], "rows": prows, "minus_null": pnull, "effect": effect}
    text = "\n\n".join(t for t in sections if t) or "No mimicry cell has finished for every seed yet."
    write_text_atomic(args.out / "mimicry.md", text + "\n")
    write_json_atomic(args.out / "mimicry.json", {"images": args.images, "finetune_steps": args.finetune_steps, "seeds": args.mimicry_seeds,
                                                  "rows": mrows, "minus_null": nrows, "budget_effect": brows, "purified": purified,
                                                  **({"unfinished": unfinished} if args.tabulate_only else {})})
    print(text)
    shown = shown_seeds(args.mimicry_seeds)
    for purification, figure_rows in ((None, mrows), *((p, v["rows"]) for p, v in purified.items())):
        write_drops_figure(args.out / f"mimicry{f'-{purification}' if purification else ''}.png",
                           [r for r in figure_rows if r["seeds"] == shown], MIMICRY_FIGURE_METRICS,
                           f"Mimicry after {args.finetune_steps} fine-tuning steps{f' on {purification}-purified sets' if purification else ''}: "
                           f"clean-tuned minus protected-tuned similarity of the best sample, {args.images} images, fine-tuning seeds "
                           f"{', '.join(map(str, args.mimicry_seeds))} ({shown}); mean and 95 % t interval over images")
    pooled = {(r["objective"], r["eps_levels"]): r for r in mrows if r["seeds"] == "pooled"}
    return {
        "seeds": args.mimicry_seeds,
        "positive_control": None if not args.control or cells[-1] not in pooled else
                            {k: pooled[cells[-1]][k] for k in ("psnr_best", "psnr_best_ci", "ssim_best", "ssim_best_ci")},
        "psnr_best_drop_at_16": {o: round(pooled[(o, 16)]["psnr_best"], 3) for o in args.objectives if (o, 16) in pooled},
        # per purification: SSIM-best drop after it minus before, and its cost to a mimic of clean images
        "purification_effect_ssim_best": {p: {f"{r['objective']}:{r['eps_levels']}": [round(r["ssim_best"], 4), r["ssim_best_ci"]]
                                              for r in v["effect"]} for p, v in purified.items()},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a run's model/ directory")
    ap.add_argument("--train-base", action="store_true", help="train the default model first (OUT/base)")
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument("--base-config", type=Path, help="config file of that base training (default: configs/default.yaml), e.g. a larger model")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "protection-grid")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=(*OBJECTIVES, RANDOM),
                    help="objectives of the grid; 'random' is the null control (a random sign of size ε at every pixel)")
    ap.add_argument("--eps", nargs="+", type=int, default=[8, 16, 32], help="budgets in 8-bit levels (of 255)")
    ap.add_argument("--control", default="photoguard:64", help="positive control OBJECTIVE:LEVELS ('' for none)")
    ap.add_argument("--pgd-steps", type=int, default=100)
    ap.add_argument("--strengths", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    ap.add_argument("--no-purify", dest="purify", action="store_false", help="SDEdit on the unpurified images only")
    ap.add_argument("--seed", dest="seeds", nargs="+", type=int, default=[0],
                    help="PGD seeds of the SDEdit grid (several: per-seed and pooled drops; the mimicry cells use the first)")
    ap.add_argument("--mimicry-seeds", nargs="*", type=int, default=[], help="fine-tuning seeds of the mimicry evaluation (none: SDEdit only)")
    ap.add_argument("--finetune-steps", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=16,
                    help="generations per caption and model (mimicry); best of 16 resolves a fine-tune's mimicry where best of 4 is mostly sampling luck")
    ap.add_argument("--finetune-override", dest="finetune_overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="training overrides of every fine-tune (mimicry.train_overrides), e.g. train.ema.enabled=false")
    ap.add_argument("--mimicry-purify", nargs="+", default=[], choices=tuple(PURIFICATION_SETTINGS),
                    help="also fine-tune on both sets purified with each of these (one more fine-tune per cell and seed, "
                         "plus one on the purified clean copies per seed)")
    ap.add_argument("--mimicry-only", action="store_true", help="skip the SDEdit cells (mimicry only)")
    ap.add_argument("--tabulate-only", action="store_true",
                    help="run nothing: tabulate the cells already finished for every seed (e.g. while the grid still runs) "
                         "and name the others")
    args = ap.parse_args(argv)
    if (args.model is None) == (not args.train_base):
        ap.error("give either --model DIR or --train-base")
    if args.images < 2:
        ap.error("--images must be >= 2 (an interval over images needs two)")
    if args.tabulate_only and not (args.out / "clean" / "metadata.jsonl").is_file():
        ap.error(f"--tabulate-only: {args.out} holds no grid yet (no clean/metadata.jsonl); run the grid first")
    if args.tabulate_only and args.train_base and not (args.out / "base" / "model" / "model_index.json").is_file():
        ap.error(f"--tabulate-only runs nothing, but {args.out / 'base'} holds no trained base model; run the grid first")

    from protection_mimicry import train_base, write_images

    from eidetic.config import load
    from workflows.mimicry import base_config
    from workflows.train import Schema

    t0 = time.perf_counter()
    model = train_base(args.out / "base", args.base_steps, args.base_config) if args.train_base else args.model
    base_layer, _, _ = base_config(model)
    interior = int(load(Schema, base=base_layer).data.resolution)
    clean = args.out / "clean"
    if not (clean / "metadata.jsonl").is_file():
        write_images(clean, args.images, interior)
    cells = [(o, e) for e in args.eps for o in args.objectives]
    if args.control:
        objective, _, levels = args.control.partition(":")
        if objective not in OBJECTIVES or not levels.isdigit():
            ap.error(f"--control must be OBJECTIVE:LEVELS with OBJECTIVE one of {', '.join(OBJECTIVES)}, got {args.control!r}")
        cells.append((objective, int(levels)))
    unfinished: list[str] = []
    result = {"benchmark": "protection_grid", "images": args.images}
    if not args.mimicry_only:
        result.update(sdedit_grid(args, model, clean, cells, unfinished))
    if args.mimicry_seeds:
        result["mimicry"] = mimicry_grid(args, model, clean, cells, unfinished)
    if args.tabulate_only:
        result["unfinished"] = unfinished
        if unfinished:
            print(f"not tabulated, unfinished for some seed: {', '.join(unfinished)}", file=sys.stderr)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
