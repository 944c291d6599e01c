"""The figures of a training run, drawn from what its run directory holds, and of the
protection grid.

One function per figure, from plain rows (the dicts a ``csv.DictReader`` gives for
``solidmark.csv``, ``extraction.csv`` and ``metrics.csv``, or the same keys with numbers)
and image arrays, to a matplotlib ``Figure`` (Agg; nothing is shown). The run report embeds
them and the monitors log the same figures to W&B, so both show the same thing. A function
returns ``None`` when the rows hold nothing to draw.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "figure_png", "SPLITS", "split_of", "eidetic_over_training", "ell_histograms", "detector_scores", "roc_curves",
    "training_curves", "memorized_grid", "extraction_grid", "as_float", "protection_drops",
]

# the three groups memorization is read on: a model memorizes duplicated images first, and
# held-out images (never trained on) are the empirical null
SPLITS = {"trained": "tab:blue", "duplicated": "tab:red", "held-out": "tab:gray"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (and closed: figures are drawn once)."""
    import io

    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def as_float(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def split_of(row: Mapping) -> list[str]:
    """The groups a ``solidmark.csv`` row belongs to (a duplicated image is also trained)."""
    if row.get("split") != "train":
        return ["held-out"]
    return ["trained", "duplicated"] if (as_float(row.get("copies")) or 1) > 1 else ["trained"]


def _deltas(rows: Sequence[Mapping]) -> list[str]:
    return [k.split("@", 1)[1] for k in rows[0] if k.startswith("memorized@")] if rows else []


# ---- SolidMark ---------------------------------------------------------------------------------
def eidetic_over_training(rows: Sequence[Mapping], uninformative: Iterable[str] = ()):
    """Eidetic count (ℓ < δ) per evaluation step, one panel per δ, for trained, duplicated and
    held-out images, each with its chance band: the central 95 % of the count if every
    prediction ignored its key (exact Poisson-binomial over the per-image chance levels)."""
    from eidetic.stats import poisson_binomial_interval

    deltas = _deltas(rows)
    if not deltas:
        return None
    uninformative = {f"{float(d):g}" for d in uninformative}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(deltas), figsize=(4.2 * len(deltas), 3.2), squeeze=False)
    by_step: dict[int, list[Mapping]] = defaultdict(list)
    for r in rows:
        by_step[int(float(r["step"]))].append(r)
    steps = sorted(by_step)
    for ax, d in zip(axes[0], deltas):
        for split, color in SPLITS.items():
            counts, lows, highs, chance, xs = [], [], [], [], []
            for step in steps:
                members = [r for r in by_step[step] if split in split_of(r)]
                if not members:
                    continue
                probabilities = [as_float(r[f"chance@{d}"]) or 0.0 for r in members]
                lo, hi = poisson_binomial_interval(probabilities)
                xs.append(step)
                counts.append(sum(int(float(r[f"memorized@{d}"])) for r in members))
                lows.append(lo)
                highs.append(hi)
                chance.append(sum(probabilities))
            if not xs:
                continue
            n = len([r for r in by_step[xs[-1]] if split in split_of(r)])
            ax.plot(xs, counts, "o-", color=color, label=f"{split} (n={n})", ms=4)
            ax.fill_between(xs, lows, highs, color=color, alpha=0.15, step=None)
            ax.plot(xs, chance, ":", color=color, lw=1)
        title = f"δ = {d}"
        if d in uninformative:
            title += "  (under the autoencoder floor)"
        ax.set_title(title, fontsize=10, color="tab:orange" if d in uninformative else "black")
        ax.set_xlabel("step")
        ax.set_ylabel("eidetic count (ℓ < δ)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="line: count; band: chance 95 %", title_fontsize=7)
    fig.tight_layout()
    return fig


def _null_cdf(pred_keys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mean over images of P(ℓ < x) if the key were independent of the prediction (k ~ U[0, 1))."""
    p = pred_keys[:, None]
    return (np.minimum(p + x[None], 1.0) - np.maximum(p - x[None], 0.0)).clip(min=0.0).mean(axis=0)


def ell_histograms(rows: Sequence[Mapping], bins: int = 20):
    """Distribution of ℓ = |predicted − true key| per group at the newest evaluation, against
    the key-independent null: the expected histogram if each prediction ignored its key."""
    if not rows:
        return None
    last = max(int(float(r["step"])) for r in rows)
    rows = [r for r in rows if int(float(r["step"])) == last]
    plt = _pyplot()
    groups = [s for s in SPLITS if any(s in split_of(r) for r in rows)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, split in zip(axes[0], groups):
        members = [r for r in rows if split in split_of(r)]
        ell = np.array([float(r["loss"]) for r in members])
        pred = np.array([float(r["pred_key"]) for r in members])
        expected = np.diff(_null_cdf(pred, edges)) * len(members)
        ax.hist(ell, bins=edges, color=SPLITS[split], alpha=0.7, label=f"{split} (n={len(members)})")
        ax.step(edges, np.r_[expected, expected[-1]], where="post", color="black", lw=1.2, label="null (key ignored)")
        ax.set_title(f"ℓ at step {last}: {split}", fontsize=10)
        ax.set_xlabel("ℓ = |predicted − true key|")
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---- extraction --------------------------------------------------------------------------------
def _label_of(row: Mapping) -> str:
    if row.get("split") != "train":
        return "held-out"
    duplicated = str(row.get("duplicated", ""))
    return {"1": "duplicated", "0": "single", "True": "duplicated", "False": "single"}.get(duplicated, "shared caption")


_LABEL_COLORS = {"duplicated": "tab:red", "single": "tab:blue", "shared caption": "tab:purple", "held-out": "tab:gray"}


def _newest(rows: Sequence[Mapping]) -> list[Mapping]:
    if not rows:
        return []
    last = max(int(float(r["step"])) for r in rows)
    return [r for r in rows if int(float(r["step"])) == last]


def detector_scores(rows: Sequence[Mapping], detectors: Sequence[str]):
    """Each detector's scores at the newest probe round, per caption label (duplicated image,
    single image, shared caption, held-out)."""
    rows = _newest(rows)
    detectors = [d for d in detectors if rows and d in rows[0]]
    if not detectors:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(detectors), figsize=(3.8 * len(detectors), 3.0), squeeze=False)
    for ax, name in zip(axes[0], detectors):
        values = np.array([as_float(r[name]) for r in rows], dtype=float)
        finite = values[np.isfinite(values)]
        edges = np.linspace(finite.min(), finite.max() + 1e-9, 16) if finite.size else 10
        for label, color in _LABEL_COLORS.items():
            picked = np.array([v for v, r in zip(values, rows) if _label_of(r) == label and np.isfinite(v)])
            if picked.size:
                ax.hist(picked, bins=edges, alpha=0.55, color=color, label=f"{label} ({picked.size})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("score")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("captions")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def roc_curves(rows: Sequence[Mapping], detectors: Sequence[str]):
    """ROC curves of every detector at the newest probe round: duplicated vs single-image
    captions, and trained vs held-out captions."""
    from eidetic.stats import rank_auc, roc_curve

    rows = _newest(rows)
    detectors = [d for d in detectors if rows and d in rows[0]]
    if not detectors:
        return None
    tasks = {
        "duplicated vs single": ([r for r in rows if _label_of(r) in ("duplicated", "single")], lambda r: _label_of(r) == "duplicated"),
        "trained vs held-out": (rows, lambda r: r.get("split") == "train"),
    }
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8), squeeze=False)
    drawn = False
    for ax, (title, (members, positive)) in zip(axes[0], tasks.items()):
        labels = [positive(r) for r in members]
        for name in detectors:
            scores = [as_float(r[name]) for r in members]
            if not members or any(s is None for s in scores):
                continue
            curve = roc_curve(scores, labels)
            if curve is None:
                continue
            drawn = True
            ax.plot(curve[0], curve[1], lw=1.5, label=f"{name} (AUC {rank_auc(scores, labels):.2f})")
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
        n_pos = sum(labels)
        ax.set_title(f"{title} ({n_pos} vs {len(labels) - n_pos})", fontsize=10)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    return fig


# ---- training ----------------------------------------------------------------------------------
def training_curves(rows: Sequence[Mapping]):
    """Training loss (per step, and a moving average) and the learning rate."""
    loss = [(int(float(r["step"])), as_float(r.get("train/loss"))) for r in rows]
    loss = [(s, v) for s, v in loss if v is not None]
    lr_key = next((k for r in rows for k in r if k.startswith("lr-")), None)
    lr = [(int(float(r["step"])), as_float(r.get(lr_key))) for r in rows] if lr_key else []
    lr = [(s, v) for s, v in lr if v is not None]
    if not loss and not lr:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.0), squeeze=False)
    ax = axes[0][0]
    if loss:
        steps, values = map(np.asarray, zip(*loss))
        ax.plot(steps, values, color="tab:blue", alpha=0.35, lw=1, label="per step")
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=1.8, label=f"mean of {window}")
        ax.legend(fontsize=8)
    ax.set_title("training loss", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    if lr:
        steps, values = zip(*lr)
        ax.plot(steps, values, color="tab:green")
    ax.set_title(f"learning rate ({lr_key or 'not logged'})", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---- image grids -------------------------------------------------------------------------------
def _pairs_grid(left: np.ndarray, right: np.ndarray, titles: Sequence[str], headers: tuple[str, str], per_row: int = 4):
    n = len(left)
    if n == 0:
        return None
    plt = _pyplot()
    rows = math.ceil(n / per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2.3 * per_row * 2 * 0.62, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        r, c = divmod(k, per_row)
        a, b = axes[r][2 * c], axes[r][2 * c + 1]
        a.imshow(left[k], interpolation="nearest")
        b.imshow(right[k], interpolation="nearest")
        a.set_title(headers[0], fontsize=7)
        b.set_title(headers[1], fontsize=7)
        a.text(0.0, -0.06, titles[k], transform=a.transAxes, fontsize=6.5, va="top", ha="left", wrap=False)
    fig.subplots_adjust(wspace=0.08, hspace=0.9)
    return fig


def _wrap(text: str, width: int = 34, lines: int = 2) -> str:
    return "\n".join(textwrap.wrap(str(text), width)[:lines])


def memorized_grid(data: Mapping):
    """The most memorized images of the newest SolidMark evaluation (``most_memorized.npz``):
    the true canvas (interior and its key border) beside the generated frame, labelled with
    id, ℓ, true and predicted key, copies and caption."""
    titles = [
        f"{i}\nℓ={float(l):.3f}  key {float(k):.2f}→{float(p):.2f}\ncopies {int(c)}  p={float(pv):.2g}\n{_wrap(cap)}"
        for i, l, k, p, c, pv, cap in zip(data["id"], data["loss"], data["key"], data["pred_key"], data["copies"], data["p_value"], data["caption"])
    ]
    return _pairs_grid(np.asarray(data["truth"]), np.asarray(data["generated"]), titles, ("true canvas", "generated frame"))


def extraction_grid(data: Mapping):
    """The verified captions of the newest extraction round (``verified.npz``): each
    generation beside its nearest training image, with the verdict and the distance."""
    titles = [
        f"{label.upper() if label != 'none' else 'not a copy'}  d={float(d):.3f}\nnearest {n}  score {float(s):.3g}\n{_wrap(cap)}"
        for label, d, n, s, cap in zip(data["label"], data["distance"], data["nearest_id"], data["score"], data["caption"])
    ]
    return _pairs_grid(np.asarray(data["generated"]), np.asarray(data["nearest"]), titles, ("generation", "nearest training"))


# ---- protection --------------------------------------------------------------------------------
def protection_drops(rows: Sequence[Mapping], metrics: Sequence[tuple[str, str]], title: str = ""):
    """Each protection's drop per budget with its interval, one panel per metric: rows carry
    ``objective``, ``eps_levels``, and per metric key ``KEY`` and ``KEY_ci`` (a [low, high]
    interval or None). A point per objective and budget, filled where the interval excludes 0,
    hollow where it does not; the null perturbation in grey, so a drop reads against it."""
    from eidetic.schema.protect import OBJECTIVES, RANDOM

    rows = [r for r in rows if any(as_float(r.get(key)) is not None for key, _ in metrics)]
    if not rows:
        return None
    order = [o for o in (*OBJECTIVES, RANDOM) if any(r["objective"] == o for r in rows)]
    order += sorted({r["objective"] for r in rows} - set(order))
    budgets = sorted({int(r["eps_levels"]) for r in rows})
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
    colours = {o: palette[i % len(palette)] for i, o in enumerate(o for o in order if o != RANDOM)}
    colours[RANDOM] = "dimgray"
    width = 0.8 / len(order)
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 2.4 * len(budgets) + 1.0), 2.8 * len(metrics)), squeeze=False, sharex=True)
    for ax, (key, label) in zip(axes[:, 0], metrics):
        for r in rows:
            value = as_float(r.get(key))
            if value is None:
                continue
            x = budgets.index(int(r["eps_levels"])) + (order.index(r["objective"]) - (len(order) - 1) / 2) * width
            ci = r.get(f"{key}_ci")
            resolved = bool(ci) and (ci[0] > 0 or ci[1] < 0)
            colour = colours[r["objective"]]
            if ci:
                ax.plot([x, x], ci, color=colour, lw=1.4)
            ax.plot([x], [value], "o", ms=5.5, color=colour, markerfacecolor=colour if resolved else "white")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    bottom = axes[-1, 0]
    bottom.set_xticks(range(len(budgets)))
    bottom.set_xticklabels([f"ε = {b}/255" for b in budgets])
    handles = [plt.Line2D([], [], marker="o", ls="-", color=colours[o], label="random (null)" if o == RANDOM else o) for o in order]
    handles.append(plt.Line2D([], [], marker="o", ls="", color="black", markerfacecolor="white", label="interval includes 0"))
    axes[0, 0].legend(handles=handles, fontsize=7, ncol=min(len(handles), 5), loc="lower left", bbox_to_anchor=(0.0, 1.02), frameon=False)
    if title:
        fig.suptitle(textwrap.fill(title.replace(" %", "\u00a0%"), 120), fontsize=8, y=0.0, va="top")  # keep "95 %" on one line
    fig.tight_layout()
    return fig
