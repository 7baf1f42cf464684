"""Symbolic tracing by ``torch.fx`` (``torch.fx.symbolic_trace``, torchvision's
``create_feature_extractor``, FX graph-mode quantization).

The tracer calls ``forward`` with :class:`torch.fx.Proxy` objects in place of tensors: a proxy
has no values, dtype or shape to check or branch on. The heads and norms therefore skip their
input checks for a proxy, and keep each step that depends on dtypes or values (the normalized
product and its float32 factors, a margin, a running-statistics update) in a function registered
with :func:`torch.fx.wrap`, which the graph calls as one node, with tensors, when it runs: the
traced graph computes what the module computes, bit for bit, with the same backward.

``isinstance(value, torch.fx.Proxy)`` is the public test; ``torch.fx._symbolic_trace``'s
``is_fx_tracing()`` is private and also true while ``torch.export`` traces (with tensors).
"""

from __future__ import annotations

from typing import Any

from torch.fx import Proxy

__all__ = ["check_traceable_group", "is_proxy"]


def is_proxy(value: object) -> bool:
    """Whether ``value`` is a ``torch.fx`` proxy, i.e. the caller is being traced symbolically."""
    return isinstance(value, Proxy)


def check_traceable_group(module: object, process_group: Any) -> None:
    """Refuse, while ``torch.fx`` traces ``module`` in training mode, a process group (which the
    graph cannot hold: a group is no value FX can record)."""
    if process_group is not None:
        raise RuntimeError(
            f"Expected the `process_group` of {type(module).__name__} to be None while torch.fx "
            "traces its training-mode update (a graph cannot record a process group), but got "
            f"{type(process_group).__name__}. Trace it in eval mode, or make it a leaf module of "
            "the tracer (e.g. `Tracer.is_leaf_module`)."
        )
