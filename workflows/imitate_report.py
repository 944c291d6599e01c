"""The imitation audit's outputs: ``report.md`` and the PSNR-vs-example-size plot."""

from __future__ import annotations

from pathlib import Path

from eidetic.imitation import PASS_PSNR
from eidetic.io import atomic_write

__all__ = ["PASS_PSNR", "write_plot", "render_report", "console_summary"]


def _kind(res: dict) -> str:
    """fixed / blind / random (negative control) / unknown -- older summaries lack ``kind``."""
    return res.get("kind") or {True: "blind", False: "fixed", None: "unknown"}[res["blind"]]


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (label, res) in enumerate(results.items()):
        rows = [r for r in res["results"] if r["heldout"]]
        if not rows:
            continue
        sizes = [r["example_size"][0] for r in rows]
        color = f"C{i}"
        kind = _kind(res)
        style = "-" if kind == "fixed" else "--"
        ax.plot(sizes, [r["heldout"]["psnr"] for r in rows], style, marker="o", color=color,
                label=f"{label}{'' if kind == 'fixed' else f' ({kind})'}")
        ax.plot(sizes, [r["heldout"]["identity_psnr"] for r in rows], ":", color=color, alpha=0.5)
    ax.axhline(PASS_PSNR, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("example side (pixels)")
    ax.set_ylabel("held-out PSNR vs teacher (dB)")
    ax.set_title("Single-example imitation (dotted: identity baseline)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: never hides a curve
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)


def render_report(section: dict) -> str:
    s = section["student"]
    lines = [
        "# Single-example imitation audit",
        "",
        f"Command: `{section['command']}`" if section["command"] else "",
        "",
        f"Example: `{section['example']}`" + (f" → `{section['example_output']}`" if section["example_output"] else ""),
        f"Student: {s['arch']} width {s['width']} depth {s['depth']} kernel {s['kernel_size']}; "
        f"{section['train']['steps']} steps, crops {section['train']['crop_size']} px, batch {section['train']['batch_size']}, L2.",
        f"Held-out: {', '.join(section['eval_images'])} (training example excluded), central {section['eval_crop']} px.",
        "",
        "| teacher | kind | input | example | mean student PSNR (dB) | images ≥ bar | worst image | SSIM | mean identity PSNR | fit on example | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bar = section["psnr_bar_db"]
    for label, res in section["teachers"].items():
        inputs = res.get("inputs")
        given = "clean photograph" if not inputs else f"{inputs['degradation']} {inputs['example_level']:g}"
        for r in res["results"]:
            h = r["heldout"]
            size = "x".join(str(v) for v in r["example_size"])
            if h:
                n_ok = sum(v["psnr"] >= bar for v in h["per_image"].values())
                lines.append(f"| {label} | {_kind(res)} | {given} | {size} | {h['psnr']:.2f} | {n_ok}/{len(h['per_image'])} | "
                             f"{h['psnr_min']:.2f} | {h['ssim']:.3f} | {h['identity_psnr']:.2f} | {r['example_fit_psnr']:.2f} | "
                             f"{r['train_seconds']:.0f} |")
            else:
                lines.append(f"| {label} | {_kind(res)} | {given} | {size} | – | – | – | – | – | {r['example_fit_psnr']:.2f} | "
                             f"{r['train_seconds']:.0f} |")
    lines += ["", f"Bar: fixed teachers should reach ≥ {bar:.0f} dB on held-out images. Identity: the teacher's "
              "input itself scored against its output (what doing nothing gets)."]
    for label, res in section["teachers"].items():
        kind = _kind(res)
        if res["meets_psnr_bar"] is not None:
            lines.append(f"- {label}: mean {'meets' if res['meets_psnr_bar'] else 'MISSES'} the bar")
        elif kind.startswith("random"):
            lines.append(f"- {label}: NEGATIVE CONTROL -- its output is random (fresh draw per call), so no student "
                         "can learn it; it bounds what a chance-level imitation scores")
        elif kind == "blind":
            lines.append(f"- {label}: blind (adapts to its input's degradation; held-out inputs are degraded at other "
                         "levels than the example): one example shows it at one level only")
        elif res["results"] and res["results"][0]["heldout"] is None:
            lines.append(f"- {label}: no teacher to query, so no held-out evaluation (give teacher=module:function)")
    lines += ["", "## Per image", ""]
    for label, res in section["teachers"].items():
        for r in res["results"]:
            h = r["heldout"]
            if not h:
                continue
            lines += per_image_table(f"{label}, example {'x'.join(str(v) for v in r['example_size'])}", h, bar)
    if section["plot"]:
        lines += ["", f"![PSNR vs example size]({section['plot']})"]
    return "\n".join(lines) + "\n"


def per_image_table(title: str, heldout: dict, bar: float) -> list[str]:
    """Markdown rows: every held-out image's student PSNR against the bar, beside its identity baseline."""
    lines = [f"**{title}**", "", f"| image | student PSNR (dB) | identity PSNR (dB) | gain (dB) | ≥ {bar:.0f} dB | SSIM | teacher record |",
             "|---|---|---|---|---|---|---|"]
    for name, v in heldout["per_image"].items():
        record = v.get("teacher_record") or v.get("teacher_draw")
        shown = ", ".join(f"{k} {x:.4f}" if isinstance(x, float) else f"{k} {x}" for k, x in record.items()) if record else ""
        lines.append(f"| {name} | {v['psnr']:.2f} | {v['identity_psnr']:.2f} | {v['psnr'] - v['identity_psnr']:+.2f} | "
                     f"{'yes' if v['psnr'] >= bar else 'no'} | {v['ssim']:.3f} | {shown} |")
    return lines + [""]


def console_summary(run_dir: Path):
    """The audit's essentials: per teacher and example size, the student's held-out PSNR against the bar."""
    from eidetic.io import read_summary

    from .report import Table, essentials

    run_dir = Path(run_dir)
    section = read_summary(run_dir).get("imitation")
    if not section:
        return None
    rows = []
    for label, res in section["teachers"].items():
        for r in res["results"]:
            h = r["heldout"]
            bar = {True: "meets", False: "MISSES", None: "–"}[res.get("meets_psnr_bar")]
            rows.append([label, _kind(res), "x".join(str(v) for v in r["example_size"]),
                         f"{h['psnr']:.2f}" if h else "–", f"{h['ssim']:.3f}" if h else "–", f"{r['example_fit_psnr']:.2f}", bar])
    table = Table(f"student PSNR on held-out images (bar {section['psnr_bar_db']:.0f} dB for fixed teachers)",
                  ["teacher", "kind", "example", "PSNR dB", "SSIM", "fit on example", "bar"], rows)
    return essentials(f"imitation audit: {run_dir.name}", [table], paths=[f"report: {run_dir / 'report.md'}", f"run directory: {run_dir}"])
