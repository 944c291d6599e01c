"""Every protection objective at several budgets against SDEdit, with and without purification.

    python benchmarks/protection_grid.py --train-base [--out DIR]          # trains the default model first
    python benchmarks/protection_grid.py --model RUN/model [--objectives sds- photoguard] [--eps 8 16 32]

``--images`` crops of the scikit-image photographs that the default data set does not contain
(as in ``protection_mimicry.py``) are protected by ``protect.py`` with every objective at every
ε (in 8-bit levels), plus a positive control (``--control``, default photoguard at 64/255: an
encoder attack with a budget large enough that it must change what SDEdit returns if the
evaluation can see protection at all). Each cell is then edited by SDEdit at several strengths,
unpurified and after each purification (JPEG 75, Gaussian noise, noisy upscaling, DiffPure with
the target model), and compared with the clean image. The drop is clean-edit minus
protected-edit PSNR, paired per image, with a 95 % t interval over images; positive means the
protection works. At low strength an edit keeps much of its input, so part of any drop there is
the perturbation itself: read the visibility column beside it.

A cell whose ``summary.json`` exists is kept (rerun the same command to resume). Writes
``OUT/grid.md`` and ``OUT/grid.json``; the last line is JSON with the positive control's drop
at the middle strength, each objective's drop at 16/255, and the wall time.
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

OBJECTIVES = ("advdm+", "advdm-", "photoguard", "mist", "sds+", "sds-", "sdst")
PURIFICATIONS = ("[{kind: jpeg, quality: 75}, {kind: gaussian, sigma: 0.05}, {kind: noisy_upscale, sigma: 0.02, factor: 2},"
                 " {kind: diffpure, t_star: 100, steps: 10}]")


def run_cell(model: Path, clean: Path, out: Path, objective: str, levels: int, args) -> dict:
    import protect

    summary = out / "summary.json"
    if not summary.is_file():
        rc = protect.main([
            f"input={clean}", f"model={model}", f"output={out}", f"objective={objective}", f"eps={levels}/255",
            f"steps={args.pgd_steps}", f"seed={args.seed}", f"evaluate.strengths=[{','.join(map(str, args.strengths))}]",
            f"evaluate.max_images={args.images}", f"purification={PURIFICATIONS if args.purify else '[]'}",
        ])
        if rc != 0:
            raise SystemExit(f"protect.py failed on {objective} at {levels}/255 (exit {rc})")
    return json.loads(summary.read_text())["protection"]


def cell_rows(section: dict, objective: str, levels: int, n: int) -> list[dict]:
    """One row per (purification, strength): the PSNR drop with its interval."""
    from eidetic.stats import t_interval

    def interval(mean, se):
        ci = t_interval(mean, se, n)
        return None if ci is None else list(ci)

    rows = []
    threats = {"none": section["sdedit"]["by_strength"]}
    threats.update({label: p["sdedit"]["by_strength"] for label, p in section.get("purification", {}).items()})
    for purification, by_strength in threats.items():
        for strength, r in by_strength.items():
            rows.append({
                "objective": objective, "eps_levels": levels, "purification": purification, "strength": float(strength),
                "psnr_drop": r["psnr_drop"], "psnr_drop_ci": interval(r["psnr_drop"], r["psnr_drop_se"]),
                "ssim_drop": r["ssim_drop"], "ssim_drop_ci": interval(r["ssim_drop"], r["ssim_drop_se"]),
                "visibility_psnr": section["visibility"]["psnr_mean"],
            })
    return rows


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    ci = r["psnr_drop_ci"]
    mark = "" if ci is None else ("**" if ci[0] > 0 else "")
    return f"{mark}{r['psnr_drop']:+.2f}{mark}" + ("" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]")


def table(rows: list[dict], strength: float, n: int, costs: dict) -> str:
    purifications = list(dict.fromkeys(r["purification"] for r in rows))
    cells = sorted({(r["objective"], r["eps_levels"]) for r in rows}, key=lambda c: (c[1], c[0]))
    by = {(r["objective"], r["eps_levels"], r["purification"], r["strength"]): r for r in rows}
    head = ["objective", "ε", "visibility PSNR"] + [f"drop, {p}" for p in purifications]
    lines = [f"SDEdit at strength {strength:g}: clean-edit minus protected-edit PSNR (dB) vs the clean image, mean "
             f"[95 % t interval] over {n} images; bold: the interval excludes 0.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective, levels in cells:
        base = by.get((objective, levels, "none", strength))
        lines.append(f"| {objective} | {levels}/255 | {base['visibility_psnr']:.1f} | "
                     + " | ".join(_cell(by.get((objective, levels, p, strength))) for p in purifications) + " |")
    if costs:
        lines += ["", "Purification's own cost on clean images (PSNR of purified vs clean, mean ± s.e.): "
                  + "; ".join(f"{k} {v['psnr_mean']:.1f} ± {v['psnr_se']:.1f} dB" for k, v in costs.items())]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a run's model/ directory")
    ap.add_argument("--train-base", action="store_true", help="train the default model first (OUT/base)")
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "protection-grid")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--eps", nargs="+", type=int, default=[8, 16, 32], help="budgets in 8-bit levels (of 255)")
    ap.add_argument("--control", default="photoguard:64", help="positive control OBJECTIVE:LEVELS ('' for none)")
    ap.add_argument("--pgd-steps", type=int, default=100)
    ap.add_argument("--strengths", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    ap.add_argument("--no-purify", dest="purify", action="store_false", help="SDEdit on the unpurified images only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if (args.model is None) == (not args.train_base):
        ap.error("give either --model DIR or --train-base")
    if args.images < 2:
        ap.error("--images must be >= 2 (an interval over images needs two)")

    from protection_mimicry import train_base, write_images

    from eidetic.config import load
    from eidetic.io import write_json_atomic, write_text_atomic
    from workflows.mimicry import base_config
    from workflows.train import Schema

    t0 = time.perf_counter()
    model = train_base(args.out / "base", args.base_steps, None) if args.train_base else args.model
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
    rows, costs = [], {}
    for i, (objective, levels) in enumerate(cells):
        print(f"[{i + 1}/{len(cells)}] {objective} at {levels}/255", file=sys.stderr, flush=True)
        section = run_cell(model, clean, args.out / f"{objective}-eps{levels}", objective, levels, args)
        rows += cell_rows(section, objective, levels, args.images)
        for label, p in section.get("purification", {}).items():
            costs.setdefault(label, p["clean_cost"])
    middle = sorted(args.strengths)[len(args.strengths) // 2]
    text = table(rows, middle, args.images, costs)
    write_text_atomic(args.out / "grid.md", text + "\n")
    write_json_atomic(args.out / "grid.json", {"images": args.images, "pgd_steps": args.pgd_steps, "rows": rows, "purification_cost": costs})
    print(text)
    pick = {(r["objective"], r["eps_levels"]): r for r in rows if r["purification"] == "none" and r["strength"] == middle}
    result = {
        "benchmark": "protection_grid", "images": args.images, "strength": middle,
        "positive_control": None if not args.control else {
            "cell": args.control, "psnr_drop": pick[cells[-1]]["psnr_drop"], "psnr_drop_ci": pick[cells[-1]]["psnr_drop_ci"]},
        "psnr_drop_at_16": {o: round(pick[(o, 16)]["psnr_drop"], 3) for o in args.objectives if (o, 16) in pick},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
