"""The one command line every tool shares::

    python train.py   [--config FILE ...] [key=value ...]
    python compare.py [--config FILE ...] [key=value ...]
    python sweep.py   [--config FILE ...] [key=value ...]
    python protect.py [--config FILE ...] [key=value ...]
    python imitate.py [--config FILE ...] [key=value ...]

Files merge left to right over the tool's schema (:mod:`eidetic.schema`), then ``key=value``
overrides on top. ``--key=value`` and ``--key value`` mean ``key=value`` (``wandb agent``
passes parameters that way; dashes in ``--n-trials`` read as underscores), and a bare
``FILE.yaml`` means ``--config FILE.yaml``. ``--print-config`` prints the resolved config and
exits. Every tool runs offline by default (``HF_HUB_OFFLINE=1``, ``WANDB_MODE=offline``) and
reports bad input the same way: ``error: <what is wrong and how to fix it>``, exit status 2,
no traceback. A finished run ends with a summary of its results (``console_summary`` of the
workflow); ``run.verbose_console=true`` (or ``EIDETIC_VERBOSE_CONSOLE=1``) also shows the
third-party notices :mod:`workflows.console` filters. The console scripts ``eidetic-train``,
``eidetic-compare``, ... call the same functions.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Sequence

__all__ = ["TOOLS", "parse_args", "main", "train", "compare", "sweep", "protect", "imitate"]

TOOLS = {
    "train": "Train a latent diffusion model on SolidMark-bordered data and monitor what it memorizes.",
    "compare": "Compare memorization mitigations on the same data, seed and budget.",
    "sweep": "Hyperparameter sweeps with Optuna (or export to a W&B sweep with export_wandb=FILE).",
    "protect": "Protect images against diffusion mimicry (score-distillation PGD) and measure it.",
    "imitate": "Single-example imitation audit of an image-to-image model.",
}


def offline_defaults() -> None:
    """Nothing is downloaded and W&B stays local unless the user says otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(tool: str, argv: Sequence[str] | None = None) -> tuple[list[str], list[str], bool]:
    """(config files, key=value overrides, print_config) of a command line."""
    parser = argparse.ArgumentParser(
        prog=f"{tool}.py", description=f"{TOOLS[tool]}\n\n{__doc__.split('Files merge', 1)[0].strip()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Every key, its default and its meaning: eidetic/schema/{tool}.py (or --print-config).",
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file (repeatable, merged left to right)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    items = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in items):
        parser.parse_args(["--help"])
    files, overrides, pending, print_config = [], [], None, False
    items_iter = iter(items)
    for item in items_iter:  # in command-line order: a later override wins
        if item == "--config":
            files.append(next(items_iter, None) or parser.error("--config needs a FILE"))
            continue
        if item.startswith("--config="):
            files.append(item.split("=", 1)[1])
            continue
        if item == "--print-config":
            print_config = True
            continue
        if pending is not None:
            overrides.append(f"{pending}={item}")
            pending = None
            continue
        match = re.fullmatch(r"(?:--)?([A-Za-z_][\w.\-\[\]]*)=(.*)", item, flags=re.S)
        if match:
            key = match[1].replace("-", "_") if item.startswith("--") else match[1]
            overrides.append(f"{key}={match[2]}")
        elif re.fullmatch(r"--[A-Za-z_][\w.\-]*", item):
            pending = item[2:].replace("-", "_")
        elif item.endswith((".yaml", ".yml")) and not item.startswith("-"):
            files.append(item)
        else:
            parser.error(f"unrecognized argument {item!r} (overrides look like key=value or --key=value)")
    if pending is not None:
        parser.error(f"--{pending} needs a value (--{pending} VALUE or --{pending}=VALUE)")
    return files, overrides, print_config


def main(tool: str, argv: Sequence[str] | None = None) -> int:
    """Run ``tool`` on a command line; returns the exit status."""
    offline_defaults()
    from omegaconf import DictConfig, OmegaConf

    from eidetic.config import to_yaml
    from eidetic.errors import InputError

    from .console import configure as configure_console
    from .report import print_summary

    workflow = importlib.import_module(f"workflows.{tool}")
    files, overrides, print_config = parse_args(tool, argv)
    try:
        cfg = workflow.load_config(files, overrides)
        if print_config:
            print(to_yaml(getattr(cfg, "config", None) or cfg), end="")
            return 0
        settings = getattr(cfg, "config", None) or cfg
        configure_console(verbose=isinstance(settings, DictConfig) and bool(OmegaConf.select(settings, "run.verbose_console", default=False)))
        result = workflow.run(cfg)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = getattr(workflow, "console_summary", None)
    renderable = None
    if summary is not None:
        try:
            renderable = summary(result)
        except Exception as exc:  # the work is done and saved: a summary that fails must not hide that
            print(f"(could not summarise the results: {exc})", file=sys.stderr)
    if renderable is not None:
        print_summary(renderable)
    else:
        print(workflow.done_message(result))
    return 0


def train(argv: Sequence[str] | None = None) -> int:
    return main("train", argv)


def compare(argv: Sequence[str] | None = None) -> int:
    return main("compare", argv)


def sweep(argv: Sequence[str] | None = None) -> int:
    return main("sweep", argv)


def protect(argv: Sequence[str] | None = None) -> int:
    return main("protect", argv)


def imitate(argv: Sequence[str] | None = None) -> int:
    return main("imitate", argv)
