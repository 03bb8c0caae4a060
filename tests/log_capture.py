"""Warnings logged while a test runs (ComfyUI reports LoRA keys it could not load this way)."""

import logging


class Warnings(logging.Handler):
    """``with Warnings() as w: ...`` then ``w.messages``: every WARNING-or-worse record's message."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *a):
        logging.getLogger().removeHandler(self)
