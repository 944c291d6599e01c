"""Protect images against diffusion mimicry (score-distillation PGD) and measure it.

    python protect.py [--config FILE ...] [key=value ...]   (see workflows/cli.py; --help, --print-config)
"""

import sys

from workflows.cli import protect as main

if __name__ == "__main__":
    sys.exit(main())
