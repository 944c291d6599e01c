"""Compare memorization mitigations on the same data, seed and budget.

    python compare.py --config configs/compare/duplication.yaml [key=value ...]

``key=value`` overrides a comparison key (``out``, ``seed``, ``quality.num_samples``, ...); any
other key is a training override applied to every setting (``train.max_steps=200``).

A comparison config (schema: ``configs/compare/default.yaml``) names the training config
files and overrides every setting shares (``base``, ``overrides``) and a list of
``settings``, each a name plus its own training overrides (e.g. ``mitigation.wen.enabled=true``).
Every setting trains in-process through ``lightning_modules.run.run`` with the same seed into
``OUT/<setting>/`` (W&B group = the comparison's name), then is scored the same way:

* memorization: the ``solidmark`` summary section (eidetic count vs chance and its p-value
  at ``delta``), when the SolidMark monitor ran; the ``extraction`` section's AUCs;
* realism: the ``realism`` section's mean IRS of generated samples, when it ran;
* quality: a Fréchet distance (torchmetrics ``FrechetInceptionDistance`` with a *local*
  feature extractor, :class:`LocalFeatures`: a randomly initialised, fixed-seed conv net —
  no Inception weights exist offline) between seeded samples of the exported model and the
  training canvases of the unmitigated data set. Its values are only comparable within one
  comparison (same extractor, same reference), not to published FIDs;
* final training loss and wall time.

Writes ``OUT/comparison.csv``, ``OUT/report.md`` and ``OUT/report.html`` (the table; the HTML
embeds the plot) and ``OUT/memorization_vs_quality.png``. Same config and seed, same table
(wall time aside). ``resume=true`` keeps the settings that already finished (their row is in
their summary's ``compare`` section) and reruns the rest, so an interrupted comparison goes on
where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent
COMPARE_SCHEMA = ROOT / "configs" / "compare" / "default.yaml"


def split_overrides(files, overrides):
    """Overrides of comparison keys stay; any other ``key=value`` is a training override for every setting."""
    from omegaconf import OmegaConf

    keys = set(OmegaConf.load(COMPARE_SCHEMA).keys())
    own = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in keys]
    training = [o for o in overrides if o not in own]
    return files, own, training


def load_compare_config(files, overrides, training_overrides=()):
    from omegaconf import OmegaConf

    from eidetic.config import ConfigError, parse_overrides

    schema = OmegaConf.load(COMPARE_SCHEMA)
    cfg = OmegaConf.merge(schema, *[OmegaConf.load(f) for f in files], parse_overrides(overrides))
    known = set(schema.keys())
    unknown = [k for k in cfg.keys() if k not in known]
    if unknown:
        raise ConfigError(f"unknown comparison config key(s) {unknown}; valid: {sorted(known)}")
    if not cfg.settings:
        raise ConfigError("a comparison needs at least one entry in 'settings'")
    if training_overrides:
        cfg.overrides = [*cfg.overrides, *training_overrides]
    names = [s.name for s in cfg.settings]
    if len(set(names)) != len(names):
        raise ConfigError(f"setting names must be unique, got {names}")
    return cfg


# ---- quality -------------------------------------------------------------------------------
def _local_features(seed: int = 0):
    import torch
    from torch import nn

    class LocalFeatures(nn.Module):
        """A fixed-seed random conv net (images in [0, 1] -> 256 features): a local stand-in for
        Inception. Random conv features separate image statistics well enough to rank sample sets
        (Naeem et al. 2020 use random embeddings for the same reason), but the numbers are not FIDs."""

        num_features = 256  # 64 channels x 2 x 2 pooled positions

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            )
            for p in self.net.parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / max(1, p[0].numel())) ** 0.5 if p.dim() > 1 else torch.zeros_like(p))
            self.requires_grad_(False).eval()

        def forward(self, x):
            return self.net(x.float() * 2 - 1).flatten(1).double()

    return LocalFeatures()


def quality(run_dir: Path, train_cfg, q) -> dict:
    """Fréchet distance of ``q.num_samples`` seeded samples vs the unmitigated training canvases."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    from eidetic.diffusion import DiffusionModel, generate
    from lightning_modules.data import SolidMarkDataModule
    from lightning_modules.models import load_pretrained

    parts = load_pretrained(run_dir / "model")
    parts.unet.eval()
    parts.text.text_encoder.eval()

    def encode_prompt(captions):
        return parts.text.text_encoder(parts.text.tokenize(captions))[0]

    model = DiffusionModel(unet=parts.unet, scheduler=parts.scheduler, encode_prompt=encode_prompt, vae=parts.vae)
    dm = SolidMarkDataModule(train_cfg.data, seed=train_cfg.seed)  # the reference: no mitigation
    train = [r for r in dm.records if r.split == "train"]
    real = dm.canvases([r.id for r in train])
    captions = [train[i % len(train)].caption for i in range(int(q.num_samples))]
    g = torch.Generator().manual_seed(int(q.seed))
    fakes = []
    with torch.no_grad():
        for start in range(0, len(captions), int(q.batch_size)):
            chunk = captions[start : start + int(q.batch_size)]
            fakes.append(generate(model, chunk, (dm.canvas_size, dm.canvas_size), steps=int(q.steps), guidance=float(q.guidance), generator=g))
    fake = torch.cat(fakes).clamp(-1, 1)
    fid = FrechetInceptionDistance(feature=_local_features(int(q.feature_seed)), normalize=True)
    fid.update((real + 1) / 2, real=True)
    fid.update((fake + 1) / 2, real=False)
    return {"frechet_distance": float(fid.compute()), "quality_samples": len(captions), "quality_real": int(real.shape[0])}


# ---- one row ------------------------------------------------------------------------------
def _row(name: str, summary: dict, delta: str, wall: float, q: dict) -> dict:
    row: dict = {"setting": name}
    sm = summary.get("solidmark")
    if sm:
        row["eidetic"] = sm.get("eidetic", {}).get(delta)
        row["chance"] = sm.get("chance", {}).get(delta)
        row["p_value"] = sm.get("p_value", {}).get(delta)
        row["solidmark_auc_heldout"] = sm.get("auc_heldout")
    ex = summary.get("extraction")
    if ex:
        for detector, entry in ex.items():
            if isinstance(entry, dict) and "auc_trained_vs_heldout" in entry:
                row[f"{detector}_auc_dup"] = entry.get("auc")
                row[f"{detector}_auc_heldout"] = entry.get("auc_trained_vs_heldout")
        row["verified_extractions"] = ex.get("verified_extractions")
    if summary.get("realism"):
        re = summary["realism"]
        row["irs_generated_mean"] = re.get("irs_generated_mean")
        row["irs_real_mean"] = re.get("irs_real_mean")
        row["fake_rate"] = re.get("fake_rate")
        if re.get("loss"):
            row["realism_loss_seconds"] = re["loss"].get("seconds_total")
    row["frechet_distance"] = q.get("frechet_distance")
    tr = summary.get("train", {})
    row["final_loss"] = tr.get("final_loss")
    row["global_step"] = tr.get("global_step")
    mit = summary.get("mitigation", {})
    row["captions_changed"] = mit.get("captions_changed")
    row["wen_skipped"] = mit.get("wen_skipped")
    row["near_duplicates_removed"] = mit.get("near_duplicates_removed")
    ctl = summary.get("controls", {})
    row["stopped_at"] = ctl.get("stop_step")
    row["excluded"] = len(ctl.get("excluded", [])) if ctl else None
    row["wall_time_s"] = round(wall, 2)
    return row


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# Column order of the table, as _row builds a row. Rows of settings kept by resume=true come
# back from summary.json with their keys sorted, so the order is imposed here, not inherited.
_COLUMNS = (
    "setting", "eidetic", "chance", "p_value", "solidmark_auc_heldout", "<detector AUCs>", "verified_extractions",
    "irs_generated_mean", "irs_real_mean", "fake_rate", "realism_loss_seconds", "frechet_distance", "final_loss",
    "global_step", "captions_changed", "wen_skipped", "near_duplicates_removed", "stopped_at", "excluded", "wall_time_s",
)


def _column_rank(name: str) -> int:
    if name in _COLUMNS:
        return _COLUMNS.index(name)
    return _COLUMNS.index("<detector AUCs>") if name.endswith(("_auc_dup", "_auc_heldout")) else len(_COLUMNS)


def write_outputs(out: Path, rows: list[dict], cfg) -> None:
    from eidetic.io import write_text_atomic

    fields = sorted(dict.fromkeys(k for r in rows for k in r), key=_column_rank)  # stable: detector columns keep their order
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    write_text_atomic(out / "comparison.csv", buf.getvalue())

    cols = [c for c in fields if any(r.get(c) is not None for r in rows)]
    lines = [
        f"# Mitigation comparison: {cfg.name}",
        "",
        f"Seed {cfg.seed}; base {list(cfg.base)}; shared overrides {list(cfg.overrides)}. "
        f"SolidMark columns at delta={cfg.delta}. `frechet_distance` is a Fréchet distance on features of a "
        "fixed-seed random conv net (not Inception; compare within this table only).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += ["", "Settings:", ""] + [f"- **{s.name}**: `{' '.join(s.overrides) or '(none)'}`" for s in cfg.settings]
    lines += ["", "![memorization vs quality](memorization_vs_quality.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    _plot(out, rows)
    write_text_atomic(out / "report.html", _html(cfg, cols, rows, out / "memorization_vs_quality.png"))


def _html(cfg, cols: list[str], rows: list[dict], plot: Path) -> str:
    import base64
    import html

    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    settings = "".join(f"<li><b>{esc(s.name)}</b>: <code>{esc(' '.join(s.overrides) or '(none)')}</code></li>" for s in cfg.settings)
    img = base64.b64encode(plot.read_bytes()).decode() if plot.exists() else ""  # embedded: the report is one file
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Mitigation comparison: {esc(str(cfg.name))}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
        "td:first-child{text-align:left}</style></head><body>"
        f"<h1>Mitigation comparison: {esc(str(cfg.name))}</h1>"
        f"<p>Seed {cfg.seed}; base {esc(str(list(cfg.base)))}; shared overrides <code>{esc(' '.join(cfg.overrides))}</code>. "
        f"SolidMark columns at delta={cfg.delta}. <code>frechet_distance</code> uses a fixed-seed random conv net "
        "(not Inception): compare within this table only.</p>"
        f"<table><tr>{head}</tr>{body}</table><h2>Settings</h2><ul>{settings}</ul>"
        + (f"<h2>Memorization vs quality</h2><img alt='memorization vs quality' src='data:image/png;base64,{img}'>" if img else "")
        + "</body></html>\n"
    )


def memorization_axis(rows: list[dict]) -> tuple[str, list[float | None], float | None]:
    """The memorization measure the plot uses: SolidMark excess over chance if present, else an
    extraction AUC. Returns its label, the values, and its chance level (None: it has none)."""
    if any(r.get("eidetic") is not None for r in rows):
        values = [None if r.get("eidetic") is None else r["eidetic"] - (r.get("chance") or 0) for r in rows]
        return "eidetic - chance (SolidMark)", values, 0.0
    for key in ("denoising_confidence_auc_heldout", "noise_prediction_norm_auc_heldout"):
        if any(r.get(key) is not None for r in rows):
            return f"{key} (extraction)", [r.get(key) for r in rows], 0.5
    return "final training loss (no monitor ran)", [r.get("final_loss") for r in rows], None


def _plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, ys, chance_level = memorization_axis(rows)
    # Settings that leave memorization unchanged land on the same point, so a legend names
    # them (colour and marker) where text labels next to the points would overprint.
    markers = "osD^v<>pPX*h"
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (r, y) in enumerate(zip(rows, ys)):
        x = r.get("frechet_distance")
        if x is None or y is None:
            continue
        ax.scatter([x], [y], marker=markers[i % len(markers)], s=50, alpha=0.8, label=r["setting"])
    if chance_level is not None:
        ax.axhline(chance_level, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("Fréchet distance, local features (lower = closer to data)")
    ax.set_ylabel(label)
    ax.set_title("memorization vs quality")
    fig.tight_layout()
    fig.savefig(out / "memorization_vs_quality.png", dpi=120)
    plt.close(fig)


def _shared_autoencoder(train_cfg, directory: Path) -> str:
    import lightning.pytorch as pl

    from lightning_modules.data import SolidMarkDataModule
    from lightning_modules.run import _train_autoencoder

    pl.seed_everything(train_cfg.seed, workers=True)
    dm = SolidMarkDataModule(train_cfg.data, seed=train_cfg.seed)  # the unmitigated data
    directory.mkdir(parents=True, exist_ok=True)
    _train_autoencoder(train_cfg, dm, directory)
    return str(directory / "autoencoder")


def compare(cfg) -> Path:
    from eidetic.config import ConfigError, load_config
    from eidetic.io import read_summary, update_summary
    from lightning_modules.run import run

    out = Path(cfg.out or f"runs/compare-{cfg.name}").resolve()
    rows = []
    base = [f if Path(f).is_absolute() else ROOT / f for f in cfg.base]

    def overrides_of(setting):
        return [
            *cfg.overrides, *setting.overrides, f"seed={cfg.seed}", f"run.dir={out / setting.name}", f"run.name={setting.name}",
            f"logging.wandb.group={cfg.name}",
        ]

    configs = [load_config(base, overrides_of(s)) for s in cfg.settings]  # every setting validated before any trains
    delta = f"{float(cfg.delta):g}"
    for s, c in zip(cfg.settings, configs):
        if c.solidmark.enabled and delta not in {f"{float(d):g}" for d in c.solidmark.deltas}:
            raise ConfigError(f"delta={cfg.delta} is not one of setting {s.name!r}'s solidmark.deltas {list(c.solidmark.deltas)}: "
                              "pick one of them or add it to solidmark.deltas")
    done = {s.name: finished_row(out / s.name) for s in cfg.settings} if cfg.resume else {}
    done = {k: v for k, v in done.items() if v is not None}
    existing = [n for n in [s.name for s in cfg.settings] + ["shared"] if (out / n).exists() and n not in done]
    if cfg.resume and "shared" in existing and (out / "shared" / "autoencoder").exists():
        existing.remove("shared")  # a finished shared autoencoder is reused as it is
    if existing and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"{out} already holds runs {existing}: a comparison starts from fresh runs "
                          "(set resume=true to keep finished settings, or overwrite=true to replace them all)")
    for name in existing:
        shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    first = configs[0]
    if cfg.share_autoencoder and first.model.space == "latent" and not (first.model.pretrained or first.model.vae.pretrained):
        # One autoencoder for every setting, trained before any of them: fairer and cheaper, and every
        # setting then starts from the same UNet initialisation (training an autoencoder in-run
        # consumes global RNG before the UNet is built).
        shared = out / "shared"
        shared_vae = str(shared / "autoencoder") if (shared / "autoencoder").exists() else _shared_autoencoder(first, shared)
        for c in configs:
            if not (c.model.pretrained or c.model.vae.pretrained):
                c.model.vae.pretrained = shared_vae
    for setting, train_cfg in zip(cfg.settings, configs):
        run_dir = out / setting.name
        if setting.name in done:
            rows.append(done[setting.name])
            continue
        os.environ.pop("EIDETIC_RUN_DIR", None)
        started = time.perf_counter()
        run(train_cfg)
        wall = time.perf_counter() - started
        q = quality(run_dir, train_cfg, cfg.quality) if cfg.quality.enabled else {}
        row = _row(setting.name, read_summary(run_dir), delta, wall, q)
        update_summary(run_dir, "compare", row)  # marks the setting finished (resume=true keeps it)
        rows.append(row)
        write_outputs(out, rows, cfg)  # partial results survive a crash of a later setting
    write_outputs(out, rows, cfg)
    return out


def finished_row(run_dir: Path) -> dict | None:
    """The table row of a setting that finished (training, scoring and quality), else None."""
    from eidetic.io import read_summary

    if not (run_dir / "summary.json").exists():
        return None
    return read_summary(run_dir).get("compare")


def main(argv=None) -> int:
    from eidetic.config import ConfigError
    from lightning_modules.data import DataError
    from lightning_modules.models import ModelLoadError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="comparison YAML (repeatable, merged left to right)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the comparison config, e.g. out=DIR seed=1")
    args = parser.parse_args(argv)
    try:
        out = compare(load_compare_config(*split_overrides(args.config, args.overrides)))
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"comparison: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
