"""User text: prompts given one per line, and quoting them in messages (a long prompt is shortened
to its first few words)."""

from __future__ import annotations

MAX_WORDS = 6
MAX_CHARS = 48


def quote(text, max_words: int = MAX_WORDS, max_chars: int = MAX_CHARS) -> str:
    """``repr`` of ``text`` with runs of whitespace squashed; a long text keeps its first
    ``max_words`` words (at most ``max_chars`` characters) and ends in ``…`` plus its word count.

    >>> quote("a painting by van gogh")
    "'a painting by van gogh'"
    >>> quote("one two three four five six seven eight")
    "'one two three four five six …' (8 words)"
    """
    s = " ".join(str(text).split())
    words = s.split(" ") if s else []
    if len(words) <= max_words and len(s) <= max_chars:
        return repr(s)
    short = " ".join(words[:max_words])
    if len(short) > max_chars:
        short = short[:max_chars].rstrip()
    return f"{short + ' …'!r} ({len(words)} words)"


def prompt_lines(text: str | None) -> tuple[str, ...] | None:
    """Non-blank lines of a multi-line input, stripped; None when there are none (callers decide
    whether that means "the defaults" or "nothing")."""
    lines = tuple(line.strip() for line in (text or "").splitlines() if line.strip())
    return lines or None
