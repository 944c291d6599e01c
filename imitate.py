"""Single-example imitation audit of an image-to-image model.

    python imitate.py [--config FILE ...] [key=value ...]   (see workflows/cli.py; --help, --print-config)
"""

import sys

from workflows.cli import imitate as main

if __name__ == "__main__":
    sys.exit(main())
