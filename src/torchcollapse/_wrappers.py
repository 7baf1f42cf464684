"""The modules inside the wrappers a model may come in (DDP, DataParallel, torch.compile, ...)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["PARALLEL", "is_compiled", "wrapper_chain"]

PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)
"""Wrappers that hold the model as ``.module``."""


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile(module)`` returns (by its type's name:
    reading ``torch._dynamo`` would import it, ~1 s)."""
    return type(model).__name__ == "OptimizedModule" and "_orig_mod" in model._modules


def wrapper_chain(
    model: nn.Module, wrappers: tuple[type[nn.Module], ...] = PARALLEL
) -> Iterator[tuple[str, nn.Module]]:
    """``("", model)``, then ``(attribute, module)`` for each module held by a wrapper of the
    given types (``module``) or by ``torch.compile``'s (``_orig_mod``), nested in any order,
    from the outside in; the last one is the model itself."""
    attribute = ""
    while True:
        yield attribute, model
        held = getattr(model, "module", None) if isinstance(model, wrappers) else None
        compiled = model._modules.get("_orig_mod") if is_compiled(model) else None
        if isinstance(held, nn.Module):
            attribute, model = "module", held
        elif isinstance(compiled, nn.Module):
            attribute, model = "_orig_mod", compiled
        else:
            return
