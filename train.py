"""Train a latent diffusion model on SolidMark-bordered data.

    python train.py [--config FILE ...] [key=value ...]

Files merge left to right over configs/default.yaml, then dotted overrides on top. To
resume: ``python train.py run.dir=RUN train.resume=last`` (the run's saved config is the
base; overrides such as ``train.max_steps=3000`` apply on top).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable, merged left to right)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    args, extra = parser.parse_known_args(argv)
    # `wandb agent` passes the sweep's parameters as --key=value: they are overrides too
    for item in extra:
        match = re.fullmatch(r"(?:--)?([A-Za-z_][\w.]*)=(.*)", item, flags=re.S)
        if not match:
            parser.error(f"unrecognized argument {item!r} (overrides look like key=value or --key=value)")
        args.overrides.append(f"{match[1]}={match[2]}")
    if os.environ.get("WANDB_SWEEP_ID"):
        args.overrides = _agent_overrides(args.overrides)
    return args


def _agent_overrides(overrides: list[str]) -> list[str]:
    """Launched by `wandb agent`: log into the run the agent created (its id and mode online)."""
    given = {o.split("=", 1)[0] for o in overrides}
    extra = []
    if os.environ.get("WANDB_RUN_ID") and "logging.wandb.id" not in given:
        extra.append(f"logging.wandb.id={os.environ['WANDB_RUN_ID']}")
    if "logging.wandb.mode" not in given:
        extra.append("logging.wandb.mode=online")
    return [*extra, *overrides]


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
        if cfg.logging.wandb.mode == "online":
            os.environ["WANDB_MODE"] = "online"  # the offline default above is only a default
        from lightning_modules.run import run

        run_dir = run(cfg)
    except (ConfigError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
