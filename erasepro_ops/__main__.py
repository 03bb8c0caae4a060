"""``python -m erasepro_ops ...``: the headless batch command (see nodes/cli.py).

Dispatches lazily: ``import erasepro_ops`` never imports ComfyUI; only running this module loads
the CLI, which imports ComfyUI (from ``$COMFYUI`` or ``<repo>/.comfyui``) when a command needs it.
"""

import importlib.util
import sys
from pathlib import Path


def main(argv=None) -> int:
    cli_path = Path(__file__).resolve().parents[1] / "nodes" / "cli.py"
    spec = importlib.util.spec_from_file_location("erasepro_cli", cli_path)
    cli = importlib.util.module_from_spec(spec)
    sys.modules["erasepro_cli"] = cli
    spec.loader.exec_module(cli)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
