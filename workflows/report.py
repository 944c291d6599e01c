"""What a training run shows a person: ``report.html``, ``report.md`` and the console summary.

Everything here is read back from the run directory (``summary.json``, the CSVs, the image
arrays the monitors save), never from a live trainer, so the same code reports a finished
run, a crashed or killed one (whatever it got to write) and an old one::

    python -m workflows.report RUN        # or: eidetic-report RUN

``report.html`` is one self-contained file (figures and images embedded as data URIs, no
external references); ``report.md`` beside it carries the same tables for terminals and
diffs, with its figures in ``report_files/``. The figures come from :mod:`eidetic.figures`,
which the monitors also log to W&B.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from eidetic.io import read_summary, write_text_atomic

__all__ = ["RunContents", "Table", "read_run", "write_report", "write_report_safely", "console_summary", "essentials", "print_summary", "main"]

log = logging.getLogger("eidetic")

MOST_MEMORIZED_ROWS = 5  # in the console summary; the report lists the monitor's whole table


# ---- reading a run directory -------------------------------------------------------------------
@dataclass
class RunContents:
    path: Path
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    config_text: str = ""
    environment: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    solidmark: list[dict] = field(default_factory=list)
    extraction: list[dict] = field(default_factory=list)
    actions: list[dict] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    sample_captions: list[str] = field(default_factory=list)
    memorized: dict | None = None
    verified: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return "train" in self.summary

    def select(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _csv(path: Path, problems: list[str]) -> list[dict]:
    if not path.exists():
        return []
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        problems.append(f"{path.name} could not be read ({exc})")
        return []


def _npz(path: Path, problems: list[str]) -> dict | None:
    if not path.exists():
        return None
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # a truncated file from a killed process: report without it
        problems.append(f"{path.relative_to(path.parents[1])} could not be read ({exc})")
        return None


def read_run(path: str | Path) -> RunContents:
    """Everything a report shows, read from ``path``; what is missing or unreadable is noted
    in ``problems`` instead of failing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"not a run directory: {path}")
    c = RunContents(path=path)
    try:
        c.summary = read_summary(path)
    except (OSError, json.JSONDecodeError) as exc:
        c.problems.append(f"summary.json could not be read ({exc})")
    config = path / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        c.config_text = config.read_text()
        try:
            c.config = OmegaConf.to_container(OmegaConf.create(c.config_text)) or {}
        except Exception as exc:  # omegaconf raises yaml's and its own errors
            c.problems.append(f"config.yaml could not be parsed ({exc})")
    else:
        c.problems.append("config.yaml is missing: this may not be a training run directory")
    env = path / "environment.json"
    if env.exists():
        try:
            c.environment = json.loads(env.read_text())
        except json.JSONDecodeError as exc:
            c.problems.append(f"environment.json could not be read ({exc})")
    c.metrics = _csv(path / "metrics.csv", c.problems)
    c.solidmark = _csv(path / "solidmark.csv", c.problems)
    c.extraction = _csv(path / "extraction.csv", c.problems)
    actions = path / "actions.jsonl"
    if actions.exists():
        for line in actions.read_text().splitlines():
            try:
                c.actions.append(json.loads(line))
            except json.JSONDecodeError:
                c.problems.append("actions.jsonl has an unreadable line (a write cut short?)")
    c.samples = sorted((path / "samples").glob("step-*.png"))
    captions = path / "samples" / "captions.json"
    if captions.exists():
        try:
            c.sample_captions = list(json.loads(captions.read_text()))
        except json.JSONDecodeError:
            pass
    c.memorized = _npz(path / "solidmark" / "most_memorized.npz", c.problems)
    c.verified = _npz(path / "extraction" / "verified.npz", c.problems)
    if not c.finished:
        c.problems.insert(0, "summary.json has no 'train' section: the run crashed, was killed or is still running; "
                             "this report shows what it wrote so far")
    return c


# ---- the tables (one source for the console, the HTML and the Markdown) ------------------------
@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def _num(value, digits: int = 3) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.{digits}g}"


def _p(value) -> str:
    if value is None:
        return "–"
    return f"{float(value):.2g}" if float(value) >= 1e-3 else f"{float(value):.1e}"


def _newest_trained_rows(c: RunContents) -> list[dict]:
    last = max(int(float(r["step"])) for r in c.solidmark)
    return [r for r in c.solidmark if int(float(r["step"])) == last and r.get("split") == "train"]


def _duplicated_counts(c: RunContents, deltas: list[str]) -> dict[str, tuple[int, float, float, int]]:
    """δ -> (eidetic, chance, one-sided Poisson-binomial p, n) of the duplicated images at the newest evaluation."""
    from eidetic.figures import split_of
    from eidetic.stats import poisson_binomial_sf

    if not c.solidmark:
        return {}
    rows = [r for r in _newest_trained_rows(c) if "duplicated" in split_of(r)]
    if not rows:
        return {}
    out = {}
    for d in deltas:
        hits, probs = sum(int(float(r.get(f"memorized@{d}") or 0)) for r in rows), [float(r.get(f"chance@{d}") or 0) for r in rows]
        out[d] = (hits, sum(probs), poisson_binomial_sf(hits, probs), len(rows))
    return out


def _duplicated_ranks(c: RunContents) -> str | None:
    """Where the duplicated images stand among the trained ones by ℓ (1 = most memorized), with
    the AUC of −ℓ duplicated vs single (bootstrap interval over images) and the one-sided
    Mann-Whitney p of "duplicated images score lower ℓ than single ones"."""
    from eidetic.stats import auc_report

    rows = sorted(_newest_trained_rows(c), key=lambda r: float(r["loss"])) if c.solidmark else []
    dup = [int(r.get("copies") or 1) > 1 for r in rows]
    if not any(dup) or all(dup):
        return None
    ranks = [i + 1 for i, d in enumerate(dup) if d]
    auc = auc_report([-float(r["loss"]) for r in rows], dup)
    lo, hi = auc["auc_ci"]
    return (f"Duplicated images rank {', '.join(map(str, ranks))} of {len(rows)} trained by ℓ (AUC {auc['auc']:.2f} "
            f"[{lo:.2f}, {hi:.2f}], {sum(dup)} vs {len(dup) - sum(dup)}; one-sided Mann-Whitney p {_p(auc['auc_p_value'])}).")


def solidmark_table(c: RunContents) -> Table | None:
    s = c.summary.get("solidmark")
    if not s:
        return None
    deltas = sorted(s.get("eidetic", {}), key=float, reverse=True)
    floor = set(s.get("uninformative_deltas") or [])
    held = s.get("heldout", {})
    dup = _duplicated_counts(c, deltas)
    headers = ["δ", f"trained (n={s.get('n_trained')})", "chance", "p", f"held-out (n={s.get('n_heldout')})", "chance", "p"]
    if dup:
        headers += [f"duplicated (n={next(iter(dup.values()))[3]})", "chance", "p"]
    rows = []
    for d in deltas:
        row = [d + (" *" if d in floor else ""), _num(s["eidetic"].get(d)), _num(s["chance"].get(d), 2), _p(s["p_value"].get(d)),
               _num(held.get("eidetic", {}).get(d)), _num(held.get("chance", {}).get(d), 2), _p(held.get("p_value", {}).get(d))]
        if dup:
            row += [str(dup[d][0]), _num(dup[d][1], 2), _p(dup[d][2])]
        rows.append(row)
    note = (f"step {s.get('step')}; eidetic count = images with ℓ < δ; chance = expected count if predictions ignored their keys; "
            f"p = one-sided Poisson-binomial. {s.get('flagged', 0)} trained image(s) flagged at FDR {s.get('flag_q')} "
            f"({s.get('heldout_flagged', 0)} held-out). AUC trained vs held-out {_num(s.get('auc_heldout'), 2)}, "
            f"duplicated vs single {_num(s.get('auc_duplicated'), 2)}; {s.get('unet_evals')} UNet evaluations in {s.get('seconds')} s.")
    ranks = _duplicated_ranks(c)
    if ranks:
        note += " " + ranks
    if floor:
        f = s.get("autoencoder_floor") or {}
        note += f" * δ under the autoencoder floor (mean round-trip error {_num(f.get('mean'))}): counts there are uninformative."
    return Table("SolidMark: eidetic memorization", headers, rows, note)


def memorized_table(c: RunContents, limit: int | None = None) -> Table | None:
    if not c.solidmark:
        return None
    last = max(int(float(r["step"])) for r in c.solidmark)
    rows = sorted(_newest_trained_rows(c), key=lambda r: float(r["loss"]))
    rows = rows[:limit] if limit else rows
    return Table(
        f"Most memorized training images (step {last})", ["id", "caption", "copies", "ℓ", "p", "flagged"],
        [[r["id"], r.get("caption", ""), r.get("copies", ""), f"{float(r['loss']):.4f}", _p(float(r["p_value"])),
          "yes" if r.get("flagged") == "1" else ""] for r in rows],
    )


def extraction_table(c: RunContents) -> Table | None:
    s = c.summary.get("extraction")
    if not s:
        return None
    detectors = [k for k, v in s.items() if isinstance(v, dict) and "auc_trained_vs_heldout" in v]
    rows = []
    for name in detectors:
        e = s[name]
        dup = e.get("auc_duplicated") or {}
        ci = dup.get("auc_ci")
        held = e.get("trained_vs_heldout") or {}
        rows.append([
            name, _num(dup.get("auc"), 2) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""),
            _num(dup.get("tpr_at_0.01_fpr"), 2), _num(held.get("auc"), 2), _num(e.get("precision_at_k"), 2),
            f"{_num(e.get('unet_evals'))} ({_num(e.get('unet_evals_per_caption'))}/caption)",
        ])
    verified = s.get("verified_extractions")
    note = f"step {s.get('step')}; {s.get('captions')} captions ({s.get('heldout_captions')} held-out). "
    note += ("verification off" if verified is None else
             f"verified extractions: {verified} (matching {s.get('verified_matching', 0)}, template {s.get('verified_template', 0)})")
    return Table("Extraction probes", ["detector", "AUC dup. vs single [95 % CI]", "TPR@1%FPR", "AUC trained vs held-out", "precision@k", "UNet evaluations"], rows, note)


def controls_lines(c: RunContents) -> list[str]:
    if not c.select("controls.enabled", False):
        return ["controls: off"]
    actions = c.actions or (c.summary.get("controls") or {}).get("actions", [])
    if not actions:
        return ["controls: on, no action taken"]
    return [f"controls: step {a.get('step')}: {a.get('action')}: {a.get('reason')}" for a in actions]


def _final_loss(c: RunContents):
    train = c.summary.get("train") or {}
    if train.get("final_loss") is not None:
        return train["final_loss"]
    losses = [r.get("train/loss") for r in c.metrics if r.get("train/loss")]
    return float(losses[-1]) if losses else None


def overview_lines(c: RunContents) -> list[str]:
    train = c.summary.get("train") or {}
    steps = train.get("global_step")
    if steps is None and c.metrics:
        steps = max(int(float(r["step"])) for r in c.metrics)
    lines = [
        f"run: {c.select('run.name', c.path.name)}  status: {'finished' if c.finished else 'incomplete'}  "
        f"steps: {_num(steps)}/{_num(c.select('train.max_steps'))}  final loss: {_num(_final_loss(c), 4)}  "
        f"wall time: {_num(train.get('wall_time_s'))} s",
    ]
    return lines


def path_lines(c: RunContents) -> list[str]:
    lines = [f"report: {c.path / 'report.html'}"]
    if (c.path / "model" / "model_index.json").exists():
        lines.append(f"model: {c.path / 'model'}")
    lines.append(f"run directory: {c.path}")
    return lines


# ---- the console summary -----------------------------------------------------------------------
def console_summary(path: str | Path):
    """A rich renderable: what a researcher reads first about a run."""
    c = read_run(path)
    lines = ([c.problems[0]] if not c.finished else []) + controls_lines(c)
    return essentials("\n".join(overview_lines(c)), (solidmark_table(c), memorized_table(c, MOST_MEMORIZED_ROWS), extraction_table(c)),
                      lines, path_lines(c))


def essentials(title: str, tables: Sequence[Table | None] = (), lines: Sequence[str] = (), paths: Sequence[str] = ()):
    """The console summary of any tool: a bold title, its tables, a few lines, then its paths."""
    from rich.console import Group
    from rich.text import Text

    parts: list = [Text(title, style="bold")]
    parts += [_rich_table(t) for t in tables if t is not None]
    if lines:
        parts.append(Text("\n".join(lines)))
    if paths:
        parts.append(Text("\n".join(paths), style="bold"))
    return Group(*parts)


def _rich_table(table: Table):
    from rich import box
    from rich.table import Table as RichTable

    t = RichTable(title=table.title, box=box.SIMPLE_HEAD, title_justify="left", caption=table.note or None,
                  caption_justify="left", pad_edge=False, title_style="bold")
    for i, h in enumerate(table.headers):
        t.add_column(h, justify="left" if i == 0 or h in _TEXT_COLUMNS else "right",
                     overflow="fold", max_width=40 if h == "caption" else None)
    for row in table.rows:
        t.add_row(*row)
    return t


def print_summary(renderable, file=None) -> None:
    from rich.console import Console

    Console(file=file or sys.stdout, soft_wrap=False, width=None if (file or sys.stdout).isatty() else 120).print(renderable)


# ---- the report --------------------------------------------------------------------------------
@dataclass
class Figure:
    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    pre: str = ""


def _figure(name: str, caption: str, make) -> Figure | None:
    from eidetic.figures import figure_png

    try:
        fig = make()
    except Exception as exc:  # one bad figure must not cost the whole report
        log.warning("report: figure %s failed: %s", name, exc)
        return None
    return Figure(name, caption, figure_png(fig)) if fig is not None else None


def _sections(c: RunContents) -> list[Section]:
    from eidetic import figures as F

    detectors = list(c.select("extraction.detectors", []) or [])
    sections = [Section("Overview", text=overview_lines(c) + controls_lines(c) + [f"note: {p}" for p in c.problems])]

    s = c.summary.get("solidmark") or {}
    memo = Section("Memorization (SolidMark)")
    memo.tables = [t for t in (solidmark_table(c),) if t]
    memo.figures = [f for f in (
        _figure("eidetic_over_training", "Eidetic count per δ over training for trained, duplicated and held-out images; "
                "shaded: the central 95 % of the count if every prediction ignored its key (dotted: its mean).",
                lambda: F.eidetic_over_training(c.solidmark, s.get("uninformative_deltas") or [])),
        _figure("ell_histograms", "ℓ = |predicted − true key| per group at the newest evaluation; black: the histogram expected "
                "if each prediction were independent of its key.", lambda: F.ell_histograms(c.solidmark)),
        _figure("most_memorized", "Most memorized training images (newest evaluation): the true canvas (interior and key "
                "border) beside the frame the model generated around the interior.",
                lambda: F.memorized_grid(c.memorized) if c.memorized else None),
    ) if f]
    memo.tables += [t for t in (memorized_table(c),) if t]
    if not (memo.tables or memo.figures):
        memo.text = ["SolidMark did not evaluate in this run (solidmark.enabled, or the run ended before its first evaluation)."]
    sections.append(memo)

    ext = Section("Extraction probes")
    ext.tables = [t for t in (extraction_table(c),) if t]
    ext.figures = [f for f in (
        _figure("detector_scores", "Each detector's scores at the newest probe round, per caption label.",
                lambda: F.detector_scores(c.extraction, detectors)),
        _figure("roc_curves", "ROC curves: duplicated vs single-image captions, and trained vs held-out captions.",
                lambda: F.roc_curves(c.extraction, detectors)),
        _figure("verified", "The most suspicious captions, verified with full generations: each generation beside its nearest "
                "training image (MATCHING/TEMPLATE: a copy within the distance threshold).",
                lambda: F.extraction_grid(c.verified) if c.verified else None),
    ) if f]
    if not (ext.tables or ext.figures):
        ext.text = ["The extraction probes did not run in this run (extraction.enabled, or the run ended before the first round)."]
    sections.append(ext)

    train = Section("Training")
    train.figures = [f for f in (_figure("training_curves", "Training loss and learning rate per step.", lambda: F.training_curves(c.metrics)),) if f]
    if not train.figures:
        train.text = ["metrics.csv holds no training curves (logging.csv off, or the run ended before its first log)."]
    sections.append(train)

    samples = Section("Validation samples")
    if c.samples:
        if c.sample_captions:
            samples.text = ["captions, left to right: " + " | ".join(c.sample_captions)]
        samples.figures = [Figure(p.stem, f"{p.stem.replace('-', ' ')}", p.read_bytes()) for p in c.samples]
    else:
        samples.text = ["no validation samples (validation.every_n_steps=0 and no validation.captions)."]
    sections.append(samples)

    env = c.environment
    setup = Section("Configuration and environment")
    if env:
        packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
        device = env.get("accelerator") or "?"
        if env.get("devices"):
            device += " (" + ", ".join(env["devices"]) + ")"
        setup.text = [f"python {env.get('python')} on {env.get('platform')}", f"device: {device}; {env.get('cpu_count')} CPUs, "
                      f"{env.get('torch_threads')} torch threads", f"packages: {packages}", f"command: {env.get('command')}"]
    else:
        setup.text = ["environment.json is missing (a run from before it was recorded)."]
    setup.pre = c.config_text
    sections.append(setup)
    return sections


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
td:first-child,th:first-child,td.text{text-align:left}caption{text-align:left;font-weight:bold;padding:.3em 0}
.note{font-size:.8em;color:#555;max-width:1000px}figure{margin:1em 0}figcaption{font-size:.85em;color:#444;max-width:1000px}
img{max-width:100%;image-rendering:pixelated}pre{background:#f6f6f6;padding:.8em;font-size:.75em;overflow:auto;max-height:40em}
.warn{color:#a60}
"""


_TEXT_COLUMNS = {"id", "caption", "detector", "setting", "teacher"}


def _html_table(t: Table) -> str:
    left = [h in _TEXT_COLUMNS for h in t.headers]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    cells = ['<td class="text">' if is_text else "<td>" for is_text in left]
    body = "".join("<tr>" + "".join(f"{cells[i]}{html.escape(str(v))}</td>" for i, v in enumerate(row)) + "</tr>" for row in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<table><caption>{html.escape(t.title)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def render_html(c: RunContents, sections: Sequence[Section]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>Eidetic report: {html.escape(str(c.select('run.name', c.path.name)))}</title>", f"<style>{_CSS}</style></head><body>",
           f"<h1>Eidetic run report: {html.escape(str(c.select('run.name', c.path.name)))}</h1>",
           f'<p class="note">{html.escape(str(c.path))}</p>']
    for s in sections:
        out.append(f'<section id="{html.escape(s.title.split()[0].lower())}"><h2>{html.escape(s.title)}</h2>')
        for line in s.text:
            cls = ' class="warn"' if line.startswith("note:") else ""
            out.append(f"<p{cls}>{html.escape(line)}</p>")
        for t in s.tables:
            out.append(_html_table(t))
        for f in s.figures:
            data = base64.b64encode(f.png).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(f.name)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
        if s.pre:
            out.append(f"<pre>{html.escape(s.pre)}</pre>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(c: RunContents, sections: Sequence[Section], figure_dir: str = "report_files") -> str:
    out = [f"# Eidetic run report: {c.select('run.name', c.path.name)}", "", f"`{c.path}`", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        out += [f"- {line}" for line in s.text] + ([""] if s.text else [])
        for t in s.tables:
            out += [f"**{t.title}**", "", "| " + " | ".join(_md_cell(h) for h in t.headers) + " |", "|" + "---|" * len(t.headers)]
            out += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in t.rows]
            out += ["", t.note, ""] if t.note else [""]
        for f in s.figures:
            out += [f"![{f.name}]({figure_dir}/{f.name}.png)", "", f"*{f.caption}*", ""]
        if s.pre:
            out += ["```yaml", s.pre.rstrip(), "```", ""]
    return "\n".join(out)


def write_report(path: str | Path) -> Path:
    """Write ``report.html``, ``report.md`` and ``report_files/`` into the run directory ``path``."""
    from eidetic.io import atomic_write

    c = read_run(path)
    sections = _sections(c)
    for s in sections:
        for f in s.figures:
            with atomic_write(c.path / "report_files" / f"{f.name}.png", "wb") as fh:
                fh.write(f.png)
    write_text_atomic(c.path / "report.md", render_markdown(c, sections))
    write_text_atomic(c.path / "report.html", render_html(c, sections))
    return c.path / "report.html"


def write_report_safely(path: str | Path) -> Path | None:
    """:func:`write_report` for the end of a run: a failure is a warning, never the run's error."""
    try:
        return write_report(path)
    except Exception as exc:
        log.warning("could not write the run report (regenerate it with: python -m workflows.report %s): %s", path, exc)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eidetic-report", description="Write report.html and report.md of a run directory "
                                     "(also of a crashed or killed run) and print its summary.")
    parser.add_argument("run_dir", nargs="+", help="training run directory (holds config.yaml, summary.json, ...)")
    parser.add_argument("--quiet", action="store_true", help="write the report without printing the summary")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dir:
        if not Path(run_dir).is_dir():
            print(f"error: not a run directory: {run_dir}", file=sys.stderr)
            status = 2
            continue
        write_report(run_dir)
        if not args.quiet:
            print_summary(console_summary(run_dir))
    return status


if __name__ == "__main__":
    sys.exit(main())
