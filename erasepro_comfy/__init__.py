"""ErasePro on ComfyUI: the host for SD1.x, SD2.x and SDXL (host.py), applying edits as patches
(apply.py) and the headless command (cli.py).

Imports ComfyUI (``comfy``), never its ``nodes`` module, so it is importable wherever ``comfy``
is: inside a running ComfyUI, in the tests, or from the command line.
"""
