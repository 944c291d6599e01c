"""Train a latent diffusion model on SolidMark-bordered data.

    python train.py [--config FILE ...] [key=value ...]

Files merge left to right over configs/default.yaml, then dotted overrides on top. To
resume: ``python train.py run.dir=RUN train.resume=last`` (the run's saved config is the
base; overrides such as ``train.max_steps=3000`` apply on top).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable, merged left to right)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    return parser.parse_args(argv)


def load(argv=None):
    from omegaconf import OmegaConf

    from eidetic.config import load_config, parse_overrides

    args = parse_args(argv)
    base = None
    cli = parse_overrides(args.overrides)
    run_dir, resume = OmegaConf.select(cli, "run.dir"), OmegaConf.select(cli, "train.resume")
    if resume and run_dir and (Path(run_dir) / "config.yaml").exists() and not args.config:
        base = OmegaConf.load(Path(run_dir) / "config.yaml")  # resume with the run's own config
    return load_config(args.config, args.overrides, base=base)


def main(argv=None) -> int:
    from eidetic.config import ConfigError
    from lightning_modules.data import DataError
    from lightning_modules.models import ModelLoadError

    try:
        cfg = load(argv)
        from lightning_modules.run import run

        run_dir = run(cfg)
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
