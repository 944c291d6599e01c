"""The comparison's outputs: ``comparison.csv``, ``report.md``, ``report.html`` and the plot."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from eidetic.io import atomic_write, write_text_atomic

__all__ = ["write_outputs", "memorization_axis", "console_summary", "over_seeds", "COLUMNS", "SEED_COLUMNS"]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):  # an interval
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


# Column order of the table, as _row builds a row. Rows of settings kept by resume=true come
# back from summary.json with their keys sorted, so the order is imposed here, not inherited.
COLUMNS = (
    "setting", "seed", "model_of", "eidetic", "chance", "p_value", "solidmark_auc_heldout", "<ladder>", "<detector AUCs>", "verified_extractions",
    "irs_paper_generated_mean", "irs_paper_real_mean", "fake_rate_paper",
    "irs_two_sided_generated_mean", "irs_two_sided_real_mean", "fake_rate_two_sided", "realism_loss_seconds", "frechet_distance",
    "frechet_unseen", "precision", "precision_ci", "recall", "recall_ci", "classifier_accuracy", "classifier_accuracy_ci", "final_loss",
    "global_step", "captions_changed", "wen_skipped", "near_duplicates_removed", "stopped_at", "excluded", "wall_time_s",
    "quality_samples", "quality_unseen", "unet_passes_per_sample",
)


_RUNG = re.compile(r"^(?:(.+)_)?(x\d+|heldout)_(eidetic|chance|p|auc|auc_ci|copy_rate|copy_rate_ci)$")
LADDER_MEASURES = ("eidetic", "chance", "p", "auc", "auc_ci", "copy_rate", "copy_rate_ci")


def _ladder_key(name: str) -> tuple | None:
    """Sort key of a per-rung column (workflows.compare.ladder_scores): rung, then measure, then
    detector; None for any other column."""
    m = _RUNG.match(name)
    if not m:
        return None
    detector, rung, measure = m.groups()
    return (1 if rung == "heldout" else 0, int(rung[1:]) if rung != "heldout" else 0, detector or "", LADDER_MEASURES.index(measure))


def _column_rank(name: str) -> int:
    if name in COLUMNS:
        return COLUMNS.index(name)
    if _ladder_key(name) is not None:
        return COLUMNS.index("<ladder>")
    return COLUMNS.index("<detector AUCs>") if name.endswith(("_auc_dup", "_auc_heldout")) else len(COLUMNS)


def _sorted_columns(names) -> list[str]:
    """Columns in table order; per-rung columns by rung, detector and measure."""
    return sorted(dict.fromkeys(names), key=lambda c: (_column_rank(c), _ladder_key(c) or ()))


# What the over-seeds table summarises: the measures a reader compares settings by
SEED_COLUMNS = (
    "eidetic_excess", "solidmark_auc_heldout", "<ladder>", "<detector AUCs>", "verified_extractions", "irs_paper_generated_mean",
    "irs_two_sided_generated_mean", "frechet_distance", "frechet_unseen", "precision", "recall", "classifier_accuracy",
    "final_loss", "wall_time_s", "unet_passes_per_sample",
)


def _number(v) -> float | None:
    if v is None or v == "" or isinstance(v, (list, tuple, bool)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _setting_of(row: dict) -> str:
    name, seed = str(row["setting"]), row.get("seed")
    suffix = f"-seed{seed}"
    return name[: -len(suffix)] if seed not in (None, "") and name.endswith(suffix) else name


def over_seeds(rows: list[dict], level: float = 0.95) -> list[dict]:
    """Per setting: the number of seeds, and for every measure of :data:`SEED_COLUMNS` the mean ±
    standard error over seeds and the difference to the first setting paired by seed, with a
    Student-t interval over the per-seed differences (training variance included; with two
    seeds it is wide, as it should be). ``eidetic_excess`` is the SolidMark count minus chance."""
    from eidetic.stats import mean_and_standard_error, t_interval

    def value(row: dict, col: str) -> float | None:
        if col.endswith("excess"):  # a SolidMark count minus its chance level: the monitor's, or a rung's
            prefix = col[: -len("excess")]
            count, chance = ("eidetic", "chance") if prefix == "eidetic_" else (prefix + "eidetic", prefix + "chance")
            e, c = _number(row.get(count)), _number(row.get(chance))
            return None if e is None or c is None else e - c
        return _number(row.get(col))

    names = list(dict.fromkeys(k for r in rows for k in r))
    detectors = [c for c in names if c.endswith(("_auc_dup", "_auc_heldout")) and c != "solidmark_auc_heldout"]
    # per rung: SolidMark excess and AUC, the detectors' AUCs, the generation copy rate
    ladder = [c.replace("_eidetic", "_excess") if c.endswith("_eidetic") else c for c in _sorted_columns(names)
              if _ladder_key(c) is not None and c.endswith(("_eidetic", "_auc", "_copy_rate"))]
    expand = {"<detector AUCs>": detectors, "<ladder>": ladder}
    cols = [c for name in SEED_COLUMNS for c in expand.get(name, [name]) if any(value(r, c) is not None for r in rows)]
    groups: dict[str, dict] = {}
    for r in rows:
        groups.setdefault(_setting_of(r), {})[str(r.get("seed"))] = r
    baseline = next(iter(groups.values()), {})
    out = []
    for name, by_seed in groups.items():
        entry: dict = {"setting": name, "seeds": len(by_seed)}
        for c in cols:
            vals = [value(r, c) for r in by_seed.values()]
            entry[c] = mean_and_standard_error(vals)
            if by_seed is baseline:
                continue
            diffs = [value(r, c) - value(baseline[s], c) for s, r in by_seed.items()
                     if s in baseline and value(r, c) is not None and value(baseline[s], c) is not None]
            mean, se = mean_and_standard_error(diffs)
            if mean is None:
                continue
            lo, hi = t_interval(mean, se, len(diffs), level) or (None, None)
            entry[f"{c}_delta"] = (mean, lo, hi, len(diffs))
        out.append(entry)
    return out


def _over_seeds_table(summary: list[dict]) -> tuple[str, list[str], list[list[str]]] | None:
    """Title, header and rows (cells: mean ± s.e., then Δ [interval] on a second line) of the
    over-seeds table; None with one seed per setting (a standard error needs two)."""
    if not summary or max(e["seeds"] for e in summary) < 2:
        return None
    cols = [c for c in summary[0] if c not in ("setting", "seeds") and not c.endswith("_delta")]
    title = f"Over seeds (mean ± standard error; Δ: vs {summary[0]['setting']}, paired by seed, 95 % t interval)"
    rows = []
    for e in summary:
        cells = [e["setting"], str(e["seeds"])]
        for c in cols:
            mean, se = e.get(c, (None, None))
            cell = "" if mean is None else _fmt(mean) + ("" if se is None else f" ± {_fmt(se)}")
            d = e.get(f"{c}_delta")
            if d is not None:
                cell += f"\nΔ {_fmt(d[0])}" + ("" if d[1] is None else f" [{_fmt(d[1])}, {_fmt(d[2])}]")
                if d[1] is not None and d[1] == d[2] and d[0] != 0:  # a zero-width interval is an artefact of few seeds
                    cell += " (the same at every seed: no spread to estimate)"
            cells.append(cell)
        rows.append(cells)
    return title, ["setting", "seeds", *cols], rows


SEED_TABLE_NOTE = "A difference is a finding only when its interval excludes 0."


def _over_seeds_lines(summary: list[dict]) -> list[str]:
    table = _over_seeds_table(summary)
    if table is None:
        return []
    title, header, rows = table
    return (["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(c.replace("\n", "<br>") for c in row) + " |" for row in rows] + ["", SEED_TABLE_NOTE])


def _seeds_text(cfg) -> str:
    seeds = list(cfg.seeds) or [cfg.seed]
    return f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def write_outputs(out: Path, rows: list[dict], cfg) -> None:
    """``comparison.csv``, ``report.md``, ``report.html`` (plot embedded) and ``memorization_vs_quality.png``."""
    fields = _sorted_columns(k for r in rows for k in r)  # stable: detector columns keep their order
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
        f"{_seeds_text(cfg)}; base {list(cfg.base)}; shared overrides {list(cfg.overrides)}. "
        f"SolidMark columns at delta={cfg.delta}. `frechet_distance` is a Fréchet distance on features of a "
        "fixed-seed random conv net (not Inception; compare within this table only); `frechet_unseen`, `precision`/`recall` "
        "(k-NN manifolds) and `classifier_accuracy` (real vs generated, cross-validated; 0.5: indistinguishable) compare the "
        "samples' interiors with `quality_unseen` real images never trained on, in the same space, with 95 % binomial intervals.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    summary = over_seeds(rows)
    lines += _over_seeds_lines(summary)
    ran = {_setting_of(r) for r in rows}
    lines += ["", "Settings:", ""] + [f"- **{s.name}**: `{' '.join(s.overrides) or '(none)'}`" + ("" if s.name in ran else " (not run)")
                                      for s in cfg.settings]
    lines += ["", "![memorization vs quality](memorization_vs_quality.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    _plot(out, rows, summary)
    write_text_atomic(out / "report.html", _html(cfg, cols, rows, out / "memorization_vs_quality.png", _over_seeds_table(summary)))


def _html(cfg, cols: list[str], rows: list[dict], plot: Path, seed_table: tuple | None = None) -> str:
    import base64
    import html

    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    ran = {_setting_of(r) for r in rows}
    settings = "".join(f"<li><b>{esc(s.name)}</b>: <code>{esc(' '.join(s.overrides) or '(none)')}</code>{'' if s.name in ran else ' (not run)'}</li>"
                       for s in cfg.settings)
    img = base64.b64encode(plot.read_bytes()).decode() if plot.exists() else ""  # embedded: the report is one file
    seeds = ""
    if seed_table is not None:
        title, header, seed_rows = seed_table
        seeds = (f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{esc(c).replace(chr(10), '<br>')}</td>" for c in row) + "</tr>" for row in seed_rows)
                 + f"</table><p>{esc(SEED_TABLE_NOTE)}</p>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Mitigation comparison: {esc(str(cfg.name))}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
        "td:first-child{text-align:left}</style></head><body>"
        f"<h1>Mitigation comparison: {esc(str(cfg.name))}</h1>"
        f"<p>{_seeds_text(cfg)}; base {esc(str(list(cfg.base)))}; shared overrides <code>{esc(' '.join(cfg.overrides))}</code>. "
        f"SolidMark columns at delta={cfg.delta}. <code>frechet_distance</code> uses a fixed-seed random conv net "
        "(not Inception): compare within this table only.</p>"
        f"<table><tr>{head}</tr>{body}</table>{seeds}<h2>Settings</h2><ul>{settings}</ul>"
        + (f"<h2>Memorization vs quality</h2><img alt='memorization vs quality' src='data:image/png;base64,{img}'>" if img else "")
        + "</body></html>\n"
    )


def memorization_axis(rows: list[dict]) -> tuple[str, list[float | None], float | None]:
    """The memorization measure the plot uses: with a duplication ladder the top rung's
    generation copy rate (ground truth no detector produced), else SolidMark excess over chance,
    else an extraction AUC. Returns its label (starting with its column name), the values, and
    its chance level (None: it has none)."""
    rates = [c for c in dict.fromkeys(k for r in rows for k in r) if re.fullmatch(r"x\d+_copy_rate", c) and c != "x1_copy_rate"]
    if rates:
        top = max(rates, key=lambda c: int(c[1:].split("_")[0]))
        return f"{top} (generations copying their own image)", [_number(r.get(top)) for r in rows], None
    if any(r.get("eidetic") is not None for r in rows):
        values = [None if r.get("eidetic") is None else r["eidetic"] - (r.get("chance") or 0) for r in rows]
        return "eidetic - chance (SolidMark)", values, 0.0
    for key in ("denoising_confidence_auc_heldout", "noise_prediction_norm_auc_heldout"):
        if any(r.get(key) is not None for r in rows):
            return f"{key} (extraction)", [r.get(key) for r in rows], 0.5
    return "final training loss (no monitor ran)", [r.get("final_loss") for r in rows], None


def _plot(out: Path, rows: list[dict], summary: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, ys, chance_level = memorization_axis(rows)
    # with several seeds a setting is one point at its means, with standard-error bars
    many = bool(summary) and max(e["seeds"] for e in summary) > 1
    if many:
        key = "eidetic_excess" if label.startswith("eidetic -") else label.split(" ")[0]
        points = [(e["setting"], e.get("frechet_distance", (None, None)), e.get(key, (None, None))) for e in summary]
    else:
        points = [(r["setting"], (r.get("frechet_distance"), None), (y, None)) for r, y in zip(rows, ys)]
    # Settings that leave memorization unchanged land on the same point, so a legend names
    # them (colour and marker) where text labels next to the points would overprint.
    markers = "osD^v<>pPX*h"
    colours = plt.get_cmap("tab20").colors  # its ten dark shades first, then the light ones (tab10 repeats after ten)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, (x, xerr), (y, yerr)) in enumerate(points):
        if x is None or y is None:
            continue
        ax.errorbar([x], [y], xerr=None if xerr is None else [xerr], yerr=None if yerr is None else [yerr],
                    fmt=markers[i % len(markers)], color=colours[(2 * i + 2 * i // 20) % 20], markersize=7, alpha=0.8,
                    capsize=3, label=name)
    if chance_level is not None:
        ax.axhline(chance_level, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("Fréchet distance, local features (lower = closer to data)")
    ax.set_ylabel(label.replace(" (", "\n(", 1) + ("\n(mean ± s.e. over seeds)" if many else ""), fontsize=9)
    ax.set_title("memorization vs quality")
    fig.tight_layout()
    with atomic_write(out / "memorization_vs_quality.png", "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
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
    rungs = sorted({m.group(2) for c in (rows[0] if rows else {}) if (m := _RUNG.match(c)) and m.group(2).startswith("x")}, key=lambda r: int(r[1:]))
    top = [(f"{rungs[-1]}_auc", f"{rungs[-1]} SolidMark AUC"), (f"{rungs[-1]}_copy_rate", f"{rungs[-1]} copy rate"),
           ("x1_copy_rate", "x1 copy rate")] if len(rungs) > 1 else []
    wanted = [("setting", "setting"), ("eidetic", "eidetic"), ("chance", "chance"), ("p_value", "p"), *top,
              ("solidmark_auc_heldout", "SolidMark AUC"), (f"{detector}_auc_dup", f"{detector} AUC"),
              ("verified_extractions", "verified"), ("frechet_distance", "Fréchet"), ("precision", "precision"),
              ("classifier_accuracy", "classifier acc."), ("final_loss", "final loss"),
              ("stopped_at", "stopped at"), ("wall_time_s", "wall s")]
    columns = [(k, label) for k, label in wanted if any(r.get(k) not in (None, "") for r in rows)]
    table = Table(f"Comparison ({len(rows)} settings)", [label for _, label in columns],
                  [[r.get(k) or "–" for k, _ in columns] for r in rows])
    return essentials(f"comparison: {Path(out).name}", [table], paths=[f"report: {Path(out) / 'report.html'}", f"table: {path}"])
