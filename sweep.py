"""Hyperparameter sweeps with Optuna (or export to a W&B sweep with export_wandb=FILE).

    python sweep.py [--config FILE ...] [key=value ...]   (see workflows/cli.py; --help, --print-config)
"""

import sys

from workflows.cli import sweep as main

if __name__ == "__main__":
    sys.exit(main())
