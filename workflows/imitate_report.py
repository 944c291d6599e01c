"""The imitation audit's outputs: ``report.md`` and the PSNR-vs-example-size plot."""

from __future__ import annotations

from pathlib import Path

from eidetic.io import atomic_write

__all__ = ["PASS_PSNR", "write_plot", "render_report", "console_summary"]

PASS_PSNR = 30.0  # the bar the audit checks for non-blind teachers (Spingarn & Michaeli report ~31 dB+)


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
        style = "--" if res["blind"] else "-"
        ax.plot(sizes, [r["heldout"]["psnr"] for r in rows], style, marker="o", color=color,
                label=f"{label}{' (blind)' if res['blind'] else ''}")
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
        "| teacher | blind | example | student PSNR (dB) | worst image | SSIM | identity PSNR | fit on example | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, res in section["teachers"].items():
        for r in res["results"]:
            h = r["heldout"]
            blind = {True: "yes", False: "no", None: "unknown"}[res["blind"]]
            size = "x".join(str(v) for v in r["example_size"])
            if h:
                lines.append(f"| {label} | {blind} | {size} | {h['psnr']:.2f} | {h['psnr_min']:.2f} | {h['ssim']:.3f} | "
                             f"{h['identity_psnr']:.2f} | {r['example_fit_psnr']:.2f} | {r['train_seconds']:.0f} |")
            else:
                lines.append(f"| {label} | {blind} | {size} | – | – | – | – | {r['example_fit_psnr']:.2f} | {r['train_seconds']:.0f} |")
    lines += ["", f"Bar: non-blind teachers should reach ≥ {section['psnr_bar_db']:.0f} dB on held-out images."]
    for label, res in section["teachers"].items():
        if res["meets_psnr_bar"] is not None:
            lines.append(f"- {label}: {'meets' if res['meets_psnr_bar'] else 'MISSES'} the bar")
        elif res["blind"]:
            draws = [r.get("example_teacher_draw") for r in res["results"] if r.get("example_teacher_draw")]
            shown = f" (training example drew {draws[0]})" if len(draws) == 1 else ""
            lines.append(f"- {label}: blind (parameters drawn per image{shown}): one example cannot pin it down; "
                         "reported as measured, per-image draws in summary.json")
        elif res["results"] and res["results"][0]["heldout"] is None:
            lines.append(f"- {label}: no teacher to query, so no held-out evaluation (give teacher=module:function)")
    if section["plot"]:
        lines += ["", f"![PSNR vs example size]({section['plot']})"]
    return "\n".join(lines) + "\n"


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
            rows.append([label, {True: "yes", False: "no", None: "unknown"}[res["blind"]], "x".join(str(v) for v in r["example_size"]),
                         f"{h['psnr']:.2f}" if h else "–", f"{h['ssim']:.3f}" if h else "–", f"{r['example_fit_psnr']:.2f}", bar])
    table = Table(f"student PSNR on held-out images (bar {section['psnr_bar_db']:.0f} dB for non-blind teachers)",
                  ["teacher", "blind", "example", "PSNR dB", "SSIM", "fit on example", "bar"], rows)
    return essentials(f"imitation audit: {run_dir.name}", [table], paths=[f"report: {run_dir / 'report.md'}", f"run directory: {run_dir}"])
