"""Compare memorization mitigations on the same data, seed and budget.

    python compare.py [--config FILE ...] [key=value ...]   (see workflows/cli.py; --help, --print-config)
"""

import sys

from workflows.cli import compare as main

if __name__ == "__main__":
    sys.exit(main())
