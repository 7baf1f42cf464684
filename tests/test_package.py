"""The package imports, exposes its version and ships type information."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torchcollapse


def test_version_matches_distribution_metadata() -> None:
    assert torchcollapse.__version__ == importlib.metadata.version("torchcollapse")


def test_package_is_typed() -> None:
    assert (Path(torchcollapse.__file__).parent / "py.typed").is_file()
