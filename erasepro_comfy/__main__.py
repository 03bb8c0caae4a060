"""``python -m erasepro_comfy ...``: the same command as ``python -m erasepro_ops``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
