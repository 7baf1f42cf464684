"""Command-line helpers shared by the benchmark scripts (imported from their own folder).

Each ``type=`` function turns one flag's text into its value or raises
``argparse.ArgumentTypeError``, so that a bad value is an argparse error naming the flag (exit
status 2) before anything is measured. :class:`HelpFormatter` keeps a docstring's layout (its
command examples) and states every flag's default.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

import torch

__all__ = [
    "HelpFormatter",
    "device",
    "names",
    "positive_int",
    "size",
    "sizes",
    "threads",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (examples keep their lines) and ``(default: ...)`` per flag."""


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def threads(text: str) -> int | None:
    """A thread count >= 1, or ``none`` (torch's own number)."""
    return None if text.lower() == "none" else positive_int(text)


def device(text: str) -> str:
    """A device string torch reads (cpu, cuda, cuda:N, ...)."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as cpu, cuda or cuda:0, got {text!r}"
        ) from None
    return text


def num_classes(text: str) -> int:
    """A number of classes: an integer >= 2 (collapse needs two classes)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 classes, got {value}")
    return value


def size(text: str) -> tuple[int, int, int]:
    """One ``NxDxK`` of three positive integers, the number of classes ``K`` at least 2."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected three positive integers joined by x (like 1000x256x10), got {text!r}"
        )
    if int(parts[2]) < 2:
        raise argparse.ArgumentTypeError(
            f"expected at least 2 classes (the last number), got {text!r}"
        )
    return int(parts[0]), int(parts[1]), int(parts[2])


def sizes(text: str) -> list[tuple[int, int, int]]:
    """Comma-separated ``AxBxC`` sizes (at least one)."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected at least one size, got {text!r}")
    return [size(item.strip()) for item in items]


def names(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """A ``type=`` function for a comma-separated list of names from ``choices``."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if not items or unknown:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names from {', '.join(allowed)}; got {text!r}"
            )
        return items

    parse.__name__ = "names"
    return parse
