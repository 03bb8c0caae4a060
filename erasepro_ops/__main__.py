"""``python -m erasepro_ops ...``: the headless batch command (``erasepro_comfy.cli``).

``import erasepro_ops`` never imports ComfyUI; the command imports ComfyUI (from ``$COMFYUI`` or
``<repo>/.comfyui``) only when a subcommand needs it.
"""

import sys


def main(argv=None) -> int:
    from erasepro_comfy.cli import main as cli_main  # the ComfyUI side, imported only to run it

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
