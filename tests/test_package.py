"""The package imports, exposes its version and ships type information."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torchcollapse


def test_version_matches_distribution_metadata() -> None:
    assert torchcollapse.__version__ == importlib.metadata.version("torchcollapse")


def test_package_is_typed() -> None:
    assert (Path(torchcollapse.__file__).parent / "py.typed").is_file()


def test_public_names_resolve_to_what_their_modules_define() -> None:
    """Every name in the ``__all__`` of the package and its subpackages exists, and the names
    the documentation points users to (the error the metrics raise, the composable losses) are
    exported where they are documented."""
    import importlib

    import torchcollapse.functional as functional
    import torchcollapse.losses as losses
    from torchcollapse.functional.means import UndefinedCollapse
    from torchcollapse.losses import _batch, self_duality, simplex_geometry, within_class

    for name in ("torchcollapse", *(f"torchcollapse.{m}" for m in SUBPACKAGES)):
        module = importlib.import_module(name)
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}: {missing}"
    assert torchcollapse.UndefinedCollapse is functional.UndefinedCollapse is UndefinedCollapse
    assert issubclass(UndefinedCollapse, ValueError)
    assert losses.batch_class_statistics is _batch.batch_class_statistics
    assert losses.within_class_variability is within_class.within_class_variability
    assert losses.simplex_geometry_of_means is simplex_geometry.simplex_geometry_of_means
    assert losses.self_duality_distance is self_duality.self_duality_distance
    assert set(functional.MEAN_KEYS)
    assert set(functional.WEIGHT_KEYS)


SUBPACKAGES = ("frames", "functional", "heads", "losses", "metrics", "norms", "stats", "tracking")
