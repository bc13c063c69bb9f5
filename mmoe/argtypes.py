"""argparse value types shared by the ``mmoe`` subcommands (standard library only, loaded at ``--help`` time)."""

from __future__ import annotations

import argparse

__all__ = ["int_list", "positive_int"]


def int_list(text: str, minimum: int = 1, example: str = "8,32,128") -> list[int]:
    """``"8,32,128"`` -> ``[8, 32, 128]`` (integers >= ``minimum``, no duplicates), for argparse types."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like {example}, got {text!r}")
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum} like {example}, got {text!r}")
    return list(dict.fromkeys(values))


def positive_int(text: str) -> int:
    """An integer >= 1, for argparse types."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
