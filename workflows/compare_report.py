"""The comparison's outputs: ``comparison.csv``, ``report.md``, ``report.html`` and the plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from eidetic.io import atomic_write, write_text_atomic

__all__ = ["write_outputs", "memorization_axis", "console_summary", "COLUMNS"]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# Column order of the table, as _row builds a row. Rows of settings kept by resume=true come
# back from summary.json with their keys sorted, so the order is imposed here, not inherited.
COLUMNS = (
    "setting", "seed", "model_of", "eidetic", "chance", "p_value", "solidmark_auc_heldout", "<detector AUCs>", "verified_extractions",
    "irs_paper_generated_mean", "irs_paper_real_mean", "fake_rate_paper",
    "irs_two_sided_generated_mean", "irs_two_sided_real_mean", "fake_rate_two_sided", "realism_loss_seconds", "frechet_distance",
    "frechet_unseen", "precision", "precision_ci", "recall", "recall_ci", "classifier_accuracy", "classifier_accuracy_ci", "final_loss",
    "global_step", "captions_changed", "wen_skipped", "near_duplicates_removed", "stopped_at", "excluded", "wall_time_s",
    "quality_samples", "quality_unseen",
)


def _column_rank(name: str) -> int:
    if name in COLUMNS:
        return COLUMNS.index(name)
    return COLUMNS.index("<detector AUCs>") if name.endswith(("_auc_dup", "_auc_heldout")) else len(COLUMNS)


def write_outputs(out: Path, rows: list[dict], cfg) -> None:
    """``comparison.csv``, ``report.md``, ``report.html`` (plot embedded) and ``memorization_vs_quality.png``."""
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
        "fixed-seed random conv net (not Inception; compare within this table only); `frechet_unseen`, `precision`/`recall` "
        "(k-NN manifolds) and `classifier_accuracy` (real vs generated, cross-validated; 0.5: indistinguishable) compare the "
        "samples' interiors with `quality_unseen` real images never trained on, in the same space, with 95 % binomial intervals.",
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
    with atomic_write(out / "memorization_vs_quality.png", "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def console_summary(out: Path):
    """The comparison's essentials: per setting, memorization at the comparison's δ, the
    first detector's AUC, verified extractions, quality, loss, time."""
    from .report import Table, essentials

    path = Path(out) / "comparison.csv"
    if not path.exists():
        return None
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    detector = next((c[: -len("_auc_dup")] for c in (rows[0] if rows else {}) if c.endswith("_auc_dup")), None)
    wanted = [("setting", "setting"), ("eidetic", "eidetic"), ("chance", "chance"), ("p_value", "p"),
              ("solidmark_auc_heldout", "SolidMark AUC"), (f"{detector}_auc_dup", f"{detector} AUC"),
              ("verified_extractions", "verified"), ("frechet_distance", "Fréchet"), ("precision", "precision"),
              ("classifier_accuracy", "classifier acc."), ("final_loss", "final loss"),
              ("stopped_at", "stopped at"), ("wall_time_s", "wall s")]
    columns = [(k, label) for k, label in wanted if any(r.get(k) not in (None, "") for r in rows)]
    table = Table(f"Comparison ({len(rows)} settings)", [label for _, label in columns],
                  [[r.get(k) or "–" for k, _ in columns] for r in rows])
    return essentials(f"comparison: {Path(out).name}", [table], paths=[f"report: {Path(out) / 'report.html'}", f"table: {path}"])
