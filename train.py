"""Train a latent diffusion model on SolidMark-bordered data and monitor what it memorizes.

    python train.py [--config FILE ...] [key=value ...]   (see workflows/cli.py; --help, --print-config)
"""

import sys

from workflows.cli import train as main

if __name__ == "__main__":
    sys.exit(main())
