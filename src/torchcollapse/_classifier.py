"""Reading the weight a classifier module applies."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

__all__ = ["applied_weight"]


def applied_weight(classifier: Any) -> Any:
    """The weight ``classifier`` applies: its ``effective_weight`` where it has one (every head of
    :mod:`torchcollapse.heads`), else its ``weight`` (``None`` if it has neither).

    An ``effective_weight`` property is called through its descriptor, so that an
    ``AttributeError`` raised inside it reaches the caller: read as an attribute, Python would
    hand the failure to ``nn.Module.__getattr__``, which reports the property itself as missing
    (and ``getattr`` with a default would then fall back to the raw ``weight``).
    """
    # (inspect is not traceable: compiled code reads the attribute with getattr, as before)
    found: Any = None
    if not torch.compiler.is_compiling():
        found = inspect.getattr_static(classifier, "effective_weight", None)
    if hasattr(found, "__get__"):  # a property (or another descriptor) of the class
        weight = found.__get__(classifier, type(classifier))
    elif found is not None:  # a plain attribute
        weight = found
    else:  # a parameter or buffer of that name, or none
        weight = getattr(classifier, "effective_weight", None)
    if not isinstance(weight, Tensor):
        weight = getattr(classifier, "weight", None)
    return weight
