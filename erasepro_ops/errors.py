"""The one exception the pipeline raises for a problem with the user's input."""

from __future__ import annotations

import logging

log = logging.getLogger("ErasePro")


class EraseProError(ValueError):
    """A problem with the user's input, worded to say what to change."""
