"""Hyperparameter sweeps with Optuna (or export to a W&B sweep).

    python sweep.py configs/sweeps/tiny.yaml [--workers N] [--n-trials N] [--storage URL|JOURNAL] [--dir DIR]
    python sweep.py configs/sweeps/tiny.yaml --export-wandb wandb_sweep.yaml

Rerunning the same command resumes the study (finished trials are not repeated). Workers on
other machines join by running the same command with ``--storage`` pointing at a shared
database URL or a journal file on a shared file system. See README "Scaling out".
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML (see eidetic/sweep.py)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--n-trials", type=int, default=None, help="total trials of the study (overrides the file)")
    p.add_argument("--storage", default=None, help="Optuna storage URL or journal file path (overrides the file)")
    p.add_argument("--dir", default=None, help="sweep directory (default sweeps/<name>)")
    p.add_argument("--export-wandb", metavar="OUT", default=None, help="write the equivalent W&B sweep YAML and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from eidetic.config import ConfigError
    from eidetic.sweep import load_sweep, to_wandb_sweep

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = load_sweep(args.sweep, n_trials=args.n_trials, storage=args.storage, dir=args.dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.export_wandb:
        import yaml

        from eidetic.io import write_text_atomic

        write_text_atomic(args.export_wandb, yaml.safe_dump(to_wandb_sweep(spec), sort_keys=False))
        print(f"W&B sweep config: {args.export_wandb}  (wandb sweep {args.export_wandb}; wandb agent ENTITY/PROJECT/ID)")
        return 0
    from lightning_modules.sweep import run_sweep, summary_text

    study = run_sweep(spec, workers=args.workers)
    print(summary_text(study, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
