"""The selective-memorization benchmark: does each monitor find the images that are really memorized?

One command trains (or reuses) the run of ``configs/experiments/selective.yaml`` — ~3,300
distinct photograph tiles with one caption each, 10 % held out, 25 images each repeated x4,
x16, x64 and x256 — then scores every monitor against two labels that no detector produced:

* the duplication ladder (rung >= k vs single images);
* generation ground truth: for every caption, full generations; a generation copies a
  training image when its interior is within an L2 threshold of it and the nearest /
  second-nearest distance ratio is below 1/3 (Gu et al.); an image is memorized when at
  least half of its caption's generations copy it.

Monitors: SolidMark at the paper's settings and at cheaper ones (Spearman rank agreement of
ℓ with the paper's), Webster's denoising confidence (faithful multi-seed, and the
guided-minus-unconditional variant), edge consistency, Wen's noise-prediction norm, the
anisotropy detector, and Carlini's clique baseline. Every AUC is a rank AUC with a stratified
bootstrap interval, TPR at 1 % FPR beside it, and the UNet evaluations per image.

    python benchmarks/memorization.py                       # train + evaluate (see README for the time)
    python benchmarks/memorization.py --run-dir RUN         # evaluate an existing run of the config

Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/memorization.png``; the last line
printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eidetic import extraction, ladder, solidmark  # noqa: E402
from eidetic.borders import strip_border  # noqa: E402
from eidetic.schema.train import SolidMarkSettings  # noqa: E402
from eidetic.stats import auc_report, benjamini_hochberg, spearman  # noqa: E402

CONFIG = ROOT / "configs" / "experiments" / "selective.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG), help="training config of the benchmark run")
    p.add_argument("--run-dir", default=None, help="an existing run of the config (default: OUT/run, trained if missing)")
    p.add_argument("--out", default="runs/memorization-benchmark", help="output directory")
    p.add_argument("--override", action="append", default=[], help="extra training override (repeatable)")
    p.add_argument("--singles", type=int, default=300, help="single images evaluated (seeded sample; all laddered images always)")
    p.add_argument("--heldout", type=int, default=200, help="held-out images evaluated (seeded sample)")
    p.add_argument("--generations", type=int, default=4, help="full generations per caption for the ground truth")
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--gen-guidance", type=float, default=3.0)
    p.add_argument("--copy-threshold", type=float, default=0.1, help="RMS on the [0, 1] scale")
    p.add_argument("--paper-steps", type=int, default=250, help="SolidMark at the paper's setting (pixel: 250 ancestral DDPM steps)")
    p.add_argument("--paper-guidance", type=float, default=3.0)
    p.add_argument("--cheap-steps", type=int, nargs="*", default=[10, 25, 50], help="cheaper SolidMark step counts (DDPM, guidance 1)")
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--flag-q", type=float, default=0.1)
    p.add_argument("--clique-captions", type=int, default=40, help="captions for the (expensive) clique baseline")
    p.add_argument("--clique-tiles", type=int, default=None,
                   help="tiles per side of the clique's tiled distance (Carlini et al.: 4); default: the largest divisor of the canvas <= 4")
    p.add_argument("--sigma", type=float, nargs="*", default=[None, 14.6], help="probe noise levels (None: the largest timestep)")
    p.add_argument("--boot", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- the run ----------------------------------------------------------------------------------
def trained_run(args):
    from workflows import train

    run_dir = Path(args.run_dir) if args.run_dir else Path(args.out) / "run"
    from workflows.rundir import RunDirectory

    finished = (run_dir / "model" / "model_index.json").exists()
    # an interrupted benchmark run continues where it stopped
    resume = ["train.resume=last"] if not finished and RunDirectory(run_dir).holds_run() else []
    # the benchmark scores its own seeded sample below, so the run's end-of-training monitor is off
    cfg = train.load_config([args.config], [f"run.dir={run_dir}", "logging.wandb.enabled=false", "solidmark.enabled=false", *resume,
                                            *args.override])
    started = time.perf_counter()
    if not finished:
        train.run(cfg)
    return cfg, run_dir.resolve(), time.perf_counter() - started


def evaluation_set(dm, args):
    records = dm.records
    return ladder.evaluation_set([r.copies for r in records], [r.split == "train" for r in records], args.singles, args.heldout, args.seed)


# ---- scoring ----------------------------------------------------------------------------------
def report(scores, labels, args) -> dict | None:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return None
    out = auc_report(scores, labels, n_boot=args.boot, seed=args.seed)
    return {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, list) else v) for k, v in out.items()}


def solidmark_scores(model, dm, idx, keys, border, options, args):
    records = dm.records
    canvases = dm.canvases([records[i].id for i in idx])
    options = {"sampler": "ddpm", **options, "seed": args.seed, "batch_size": args.batch_size}
    out = solidmark.outpaint_border(model, canvases, [records[i].caption for i in idx], border, noise_ids=idx, **options)
    return out.border_key, solidmark.eidetic_scores(out.border_key, keys), out.unet_evals / len(idx)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, run_dir, train_s = trained_run(args)
    from eidetic.pipelines import load_diffusion_model
    from lightning_modules.data import SolidMarkDataModule

    dm = SolidMarkDataModule(cfg.data, seed=cfg.seed, mitigation=cfg.mitigation)
    model = load_diffusion_model(run_dir / "model")
    records, border = dm.records, int(cfg.data.border)
    idx = evaluation_set(dm, args)
    ev = [records[i] for i in idx]
    copies = np.array([r.copies for r in ev])
    trained = np.array([r.split == "train" for r in ev])
    keys = torch.tensor([r.key for r in ev], dtype=torch.float64)
    captions = [r.caption for r in ev]
    shape = (dm.canvas_size, dm.canvas_size)
    clique_tiles = args.clique_tiles or max(t for t in range(1, 5) if dm.canvas_size % t == 0)
    if dm.canvas_size % clique_tiles:  # checked now, not after half an hour of scoring
        raise SystemExit(f"--clique-tiles {clique_tiles} does not divide the {dm.canvas_size}px canvas")
    timings: dict[str, float] = {"train_s": round(train_s, 1)}
    print(f"[benchmark] {len(ev)} images evaluated: {int((copies > 1).sum())} laddered, {int(((copies == 1) & trained).sum())} single, "
          f"{int((~trained).sum())} held out", flush=True)

    # ground truth by generation
    t = time.perf_counter()
    train_idx = [i for i, r in enumerate(records) if r.split == "train"]
    position = {i: k for k, i in enumerate(train_idx)}
    train_interiors = dm.images([records[i].id for i in train_idx])
    own = [position.get(i, -1) for i in idx]
    truth = extraction.generation_ground_truth(
        model, captions, own, train_interiors, shape, crop=lambda x: strip_border(x, border), generations=args.generations,
        steps=args.gen_steps, guidance=args.gen_guidance, threshold=args.copy_threshold, seed=args.seed, batch_size=args.batch_size,
        noise_ids=idx,
    )
    memorized = (truth.own_rate.numpy() >= 0.5) & trained
    timings["ground_truth_s"] = round(time.perf_counter() - t, 1)
    rungs = sorted(set(copies[trained].tolist()))
    copy_rates = ladder.copy_rates_by_rung(truth.own_rate, truth.copy_rate, copies, trained, args.generations)
    print(f"[benchmark] ground truth: {json.dumps(copy_rates)}", flush=True)

    single = trained & (copies == 1)
    top = trained & (copies == max(rungs))

    def labels_for(scores):
        rows = {}
        rows["top_vs_single"] = report(scores[top | single], top[top | single], args)
        rows["laddered_vs_single"] = report(scores[trained], (copies > 1)[trained], args)
        rows["generation_truth"] = report(scores[trained], memorized[trained], args)
        return rows

    results: dict = {"monitors": {}, "copy_rates": copy_rates, "n": {"laddered": int((copies > 1).sum()), "single": int(single.sum()),
                                                                     "heldout": int((~trained).sum()), "memorized_by_generation": int(memorized.sum())}}

    # SolidMark
    losses = {}
    # the paper's plain replacement at its settings and cheaper step counts, and the monitor's
    # own default (reconstruction-guided for pixel models), all scored on the same images
    monitor_default = SolidMarkSettings().outpaint_options(latent=model.vae is not None)
    monitor_default.pop("seed"), monitor_default.pop("batch_size")
    settings = [("solidmark_paper", {"steps": args.paper_steps, "guidance": args.paper_guidance}),
                *[(f"solidmark_ddpm{s}", {"steps": s, "guidance": 1.0}) for s in args.cheap_steps],
                ("solidmark_monitor_default", monitor_default)]
    for name, options in settings:
        t = time.perf_counter()
        pred, loss, evals = solidmark_scores(model, dm, idx, keys, border, options, args)
        losses[name] = (pred, loss)
        entry = labels_for(-loss.numpy())
        entry.update(unet_evals_per_image=evals, seconds=round(time.perf_counter() - t, 1), options=options)
        entry["by_rung"] = ladder.solidmark_by_rung(pred, keys, copies, trained, args.delta, n_boot=args.boot, seed=args.seed)
        for split, rung, mask in (("single", "x1", single), ("heldout", "heldout", ~trained)):
            m = torch.from_numpy(mask)
            flagged = benjamini_hochberg(solidmark.per_image_p_values(pred[m], keys[m]).numpy(), args.flag_q)
            counts = entry["by_rung"][rung]
            entry[f"{split}_eidetic"] = {"count": counts["eidetic"], "chance": round(counts["chance"], 2), "p_value": counts["p_value"],
                                         "n": counts["n"], "flagged_fraction": round(float(flagged.mean()), 4)}
        m_top = torch.from_numpy(top)
        flagged_top = benjamini_hochberg(solidmark.per_image_p_values(pred[m_top], keys[m_top]).numpy(), args.flag_q)
        entry["top_rung_flagged_fraction"] = round(float(flagged_top.mean()), 4)
        results["monitors"][name] = entry
        print(f"[benchmark] {name}: {json.dumps(entry)}", flush=True)
    paper_loss = losses["solidmark_paper"][1].numpy()
    for name in losses:
        if name != "solidmark_paper":
            results["monitors"][name]["spearman_vs_paper"] = spearman(losses[name][1].numpy(), paper_loss)

    # caption-level detectors (every caption here names one image)
    detector_runs = []
    for sigma in args.sigma:
        tag = "" if sigma is None else f"@sigma{sigma:g}"
        detector_runs += [
            (f"denoising_confidence{tag}", "denoising_confidence", {"reference": "noise", "seeds": 8, "guidance": 7.5, "sigma": sigma}),
            (f"denoising_confidence_1seed{tag}", "denoising_confidence", {"reference": "noise", "seeds": 1, "guidance": 7.5, "sigma": sigma}),
            (f"guided_minus_unconditional{tag}", "denoising_confidence", {"reference": "unconditional", "seeds": 1, "guidance": 7.5, "sigma": sigma}),
            (f"edge_consistency{tag}", "edge_consistency", {"seeds": 4, "guidance": 7.5, "sigma": sigma}),
        ]
    detector_runs += [
        ("noise_prediction_norm_1step", "noise_prediction_norm", {"steps": 50, "first_steps": 1}),
        ("noise_prediction_norm_5steps", "noise_prediction_norm", {"steps": 50, "first_steps": 5}),
        ("anisotropy", "anisotropy", {}),
        ("anisotropy_sd1_norm", "anisotropy", {"norm_scale": "sd1_latent"}),
    ]
    for name, detector, options in detector_runs:
        t = time.perf_counter()
        r = extraction.DETECTORS[detector](model, captions, shape, seed=args.seed, batch_size=args.batch_size, **options)
        entry = labels_for(r.scores.numpy())
        entry["trained_vs_heldout"] = report(r.scores.numpy(), trained, args)
        entry.update(unet_evals_per_image=r.unet_evals_per_caption, seconds=round(time.perf_counter() - t, 1), options=options)
        results["monitors"][name] = entry
        print(f"[benchmark] {name}: AUC top/single {entry['top_vs_single'] and entry['top_vs_single']['auc']}, "
              f"vs generation truth {entry['generation_truth'] and entry['generation_truth']['auc']}", flush=True)

    # the clique baseline on a seeded subset (it spends generations x steps evaluations per caption)
    rng = random.Random(args.seed + 1)
    sub = sorted(set(np.flatnonzero(copies > 1).tolist()) | set(rng.sample(np.flatnonzero(single).tolist(), min(args.clique_captions, int(single.sum())))))
    t = time.perf_counter()
    r = extraction.clique_detector(model, [captions[i] for i in sub], shape, generations=16, steps=25, guidance=3.0, threshold=0.15, tiles=clique_tiles,
                                   min_clique=4, seed=args.seed, batch_size=args.batch_size, noise_ids=[idx[i] for i in sub])
    sub_np = np.array(sub)
    entry = {"top_vs_single": report(r.scores.numpy(), top[sub_np], args) if top[sub_np].any() else None,
             "laddered_vs_single": report(r.scores.numpy(), (copies > 1)[sub_np], args),
             "generation_truth": report(r.scores.numpy(), memorized[sub_np], args),
             "unet_evals_per_image": r.unet_evals_per_caption, "seconds": round(time.perf_counter() - t, 1), "captions": len(sub),
             "tiles": clique_tiles}
    results["monitors"]["clique"] = entry

    results["timings"] = timings
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    write_outputs(out_dir, results, args, losses, copies, trained, memorized)
    return headline(results)


def headline(results) -> dict:
    mon = results["monitors"]
    paper = mon["solidmark_paper"]
    cheap = {k: v for k, v in mon.items() if v.get("unet_evals_per_image", 1e9) <= 2 and v.get("generation_truth")}
    best = max(cheap, key=lambda k: cheap[k]["generation_truth"]["auc"]) if cheap else None
    default = "solidmark_monitor_default"
    # the cheapest SolidMark setting that ranks images like the paper's (Spearman >= 0.9) with an
    # AUC inside the paper setting's interval
    faithful = [k for k, v in mon.items() if k.startswith("solidmark_") and k != "solidmark_paper" and v.get("top_vs_single")
                and v.get("spearman_vs_paper", 0) >= 0.9 and paper["top_vs_single"]
                and paper["top_vs_single"]["auc_ci"][0] <= v["top_vs_single"]["auc"] <= paper["top_vs_single"]["auc_ci"][1]]
    cheapest = min(faithful, key=lambda k: mon[k]["unet_evals_per_image"]) if faithful else None
    out = {
        "solidmark_auc": paper["top_vs_single"]["auc"] if paper["top_vs_single"] else None,
        "solidmark_auc_ci": paper["top_vs_single"]["auc_ci"] if paper["top_vs_single"] else None,
        "best_cheap_detector": best,
        "best_cheap_auc": cheap[best]["generation_truth"]["auc"] if best else None,
        "best_cheap_tpr_at_1fpr": cheap[best]["generation_truth"]["tpr_at_0.01_fpr"] if best else None,
        "monitor_default_auc": mon[default]["top_vs_single"]["auc"] if mon[default]["top_vs_single"] else None,
        "monitor_default_auc_ci": mon[default]["top_vs_single"]["auc_ci"] if mon[default]["top_vs_single"] else None,
        "cheapest_faithful_solidmark": cheapest,
        "single_p_value": mon[default]["single_eidetic"]["p_value"],
        "heldout_p_value": mon[default]["heldout_eidetic"]["p_value"],
        "copy_rate_top_rung": results["copy_rates"][max((k for k in results["copy_rates"] if k.startswith("x")), key=lambda k: int(k[1:]))]["copy_rate"],
        "copy_rate_single": results["copy_rates"]["x1"]["copy_rate"],
        "wall_s": results["wall_s"],
    }
    print(json.dumps(out))
    return out


def write_outputs(out_dir: Path, results, args, losses, copies, trained, memorized) -> None:
    from eidetic.io import atomic_write, write_json_atomic, write_text_atomic

    write_json_atomic(out_dir / "results.json", results)
    lines = ["| monitor | UNet evals / image | AUC top rung vs single [95% CI] | AUC vs generation truth [95% CI] | TPR@1%FPR (truth) |",
             "|---|---|---|---|---|"]

    def cell(r):
        return "–" if not r else f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]"

    for name, e in results["monitors"].items():
        g = e.get("generation_truth")
        lines.append(f"| {name} | {e['unet_evals_per_image']:.0f} | {cell(e.get('top_vs_single'))} | {cell(g)} | "
                     f"{'–' if not g else format(g['tpr_at_0.01_fpr'], '.3f')} |")
    write_text_atomic(out_dir / "results.md", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    loss = losses["solidmark_paper"][1].numpy()
    for c in sorted(set(copies[trained].tolist())):
        m = trained & (copies == c)
        axes[0].hist(loss[m], bins=30, range=(0, 1), histtype="step", density=True, label=f"x{c} (n={int(m.sum())})")
    axes[0].hist(loss[~trained], bins=30, range=(0, 1), histtype="step", density=True, linestyle="--", label=f"held out (n={int((~trained).sum())})")
    axes[0].set_xlabel("SolidMark ℓ (paper settings)")
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=7)
    axes[0].set_title("ℓ per duplication rung")
    names = [k for k, v in results["monitors"].items() if v.get("generation_truth")]
    aucs = [results["monitors"][k]["generation_truth"]["auc"] for k in names]
    lo = [a - results["monitors"][k]["generation_truth"]["auc_ci"][0] for k, a in zip(names, aucs)]
    hi = [results["monitors"][k]["generation_truth"]["auc_ci"][1] - a for k, a in zip(names, aucs)]
    axes[1].barh(range(len(names)), aucs, xerr=[lo, hi], color="tab:blue", alpha=0.7)
    axes[1].axvline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[1].set_yticks(range(len(names)), names, fontsize=7)
    axes[1].set_xlabel("AUC vs generation ground truth (95% bootstrap CI)")
    axes[1].set_xlim(0, 1)
    fig.tight_layout()
    with atomic_write(out_dir / "memorization.png", "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
