"""Swap the classifier of a model for another head, whatever the model's library.

Where the classifier lives differs by library: timm models say it themselves
(``get_classifier()``), torchvision models keep it in ``fc`` (ResNet, RegNet, ShuffleNet,
GoogLeNet), ``classifier`` or its last layer (VGG, AlexNet, DenseNet, MobileNet, EfficientNet,
ConvNeXt), ``heads.head`` (ViT) or ``head`` (Swin), and a plain :class:`torch.nn.Sequential` ends
with it. :func:`replace_head` finds it, builds the new head from its shape and puts it in place,
so the training code stays as it was (Hoffer et al., 2018, fix the classifier this way).

References:
    Hoffer, Hubara & Soudry (2018), *Fix your classifier: the marginal value of training the last
    weight layer*, ICLR.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.optim.swa_utils import AveragedModel

from torchcollapse._wrappers import PARALLEL, wrapper_chain

__all__ = ["find_head", "replace_head"]

_LOOKED_FOR = (
    "`get_classifier()` (timm), `.fc`, `.classifier` or `.classifier[-1]`, `.heads.head`, "
    "`.head` (torchvision), or a trailing `nn.Linear` in an `nn.Sequential`"
)


def _head_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, num_classes)`` of a linear-like classifier, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features = getattr(module, "in_features", None)
    num_classes = getattr(module, "num_classes", None)
    if (
        isinstance(in_features, int)
        and isinstance(num_classes, int)
        and in_features > 0
        and num_classes > 0  # not a wrapper whose classifier was removed (timm, num_classes=0)
    ):
        return in_features, num_classes  # a torchcollapse head (or one that follows its naming)
    return None


def _trailing_linear(sequential: nn.Sequential) -> str | None:
    """Dotted path of the last classifier in ``sequential`` followed only by parameter-free
    layers, looking into a trailing ``nn.Sequential`` (``Sequential(backbone,
    Sequential(Dropout, Linear))``: ``"1.1"``)."""
    for name, module in reversed(list(sequential.named_children())):
        if _head_shape(module) is not None:
            return name
        if isinstance(module, nn.Sequential):
            # (a fixed-frame head has no parameters: a Sequential holding one may have none)
            inner = _trailing_linear(module)
            if inner is not None:
                return f"{name}.{inner}"
        if any(True for _ in module.parameters()):
            return None  # a layer with parameters after it: not the classifier
        # dropout, activations, flatten: may follow the classifier
    return None


_MODULE_WRAPPERS = (*PARALLEL, AveragedModel)


def _unwrap(model: nn.Module) -> tuple[str, nn.Module]:
    """The model inside ``DistributedDataParallel``, ``DataParallel``, ``AveragedModel``
    (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, nested in any order, and the
    dotted prefix of its names in ``model.named_modules()`` (``""`` for an unwrapped model)."""
    chain = list(wrapper_chain(model, _MODULE_WRAPPERS))
    return "".join(f"{attribute}." for attribute, _ in chain[1:]), chain[-1][1]


def _inside_ddp(model: nn.Module) -> bool:
    """Whether a ``DistributedDataParallel`` is among the wrappers :func:`_unwrap` goes through."""
    return any(
        isinstance(module, nn.parallel.DistributedDataParallel)
        for _, module in wrapper_chain(model, _MODULE_WRAPPERS)
    )


def _qualified_name(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target and name:
            return str(name)
    return None


def _candidates(model: nn.Module) -> list[str]:
    """Dotted paths of where the classifier may be, most specific convention first."""
    paths: list[str] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, (tuple, list)) and len(classifier) > 1:
            # timm's distilled models (DeiT): a class head and a distillation head, averaged at
            # inference; replacing one of them would leave the other giving half the logits
            names = [_qualified_name(model, module) or "?" for module in classifier]
            raise ValueError(
                f"Expected one classifier, but `get_classifier()` of {type(model).__name__} "
                f"returns {len(classifier)} ({', '.join(names)}; a distilled model): replace "
                "each yourself (e.g. `model.head = factory(...)` and `model.head_dist = "
                "factory(...)`)."
            )
        if isinstance(classifier, nn.Module):
            name = _qualified_name(model, classifier)
            if name is not None:
                paths.append(name)
    for attribute in ("fc", "classifier", "head"):
        child = getattr(model, attribute, None)
        if isinstance(child, nn.Sequential):
            last = _trailing_linear(child)
            if last is not None:
                paths.append(f"{attribute}.{last}")
        elif isinstance(child, nn.Module):
            paths.append(attribute)
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.Module) and isinstance(getattr(heads, "head", None), nn.Module):
        paths.append("heads.head")
    if isinstance(model, nn.Sequential):
        last = _trailing_linear(model)
        if last is not None:
            paths.append(last)
    return paths


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Find the classifier of ``model``: its dotted name and the module.

    Looks, in order, at timm's ``get_classifier()``; torchvision's ``fc``, ``classifier`` (or the
    last ``nn.Linear`` of a ``classifier`` ``nn.Sequential``), ``head``, ``heads.head``; and the
    last ``nn.Linear`` of an ``nn.Sequential`` followed only by parameter-free layers (dropout,
    activations). A model wrapped in ``DistributedDataParallel``, ``nn.DataParallel``,
    :class:`torch.optim.swa_utils.AveragedModel` (``.module``) or compiled by ``torch.compile``
    (``._orig_mod``) is searched inside its wrappers. In an ``nn.Sequential`` that ends with
    another one (``nn.Sequential(backbone, nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10)))``)
    the search goes on inside it, and the name is dotted (``"1.1"``). The first candidate that
    is an ``nn.Linear`` (or a torchcollapse head) wins.

    Args:
        model: the model.

    Returns:
        ``(name, module)``, ``name`` as in ``model.named_modules()`` (through a wrapper,
        prefixed: ``"module.fc"``, ``"_orig_mod.fc"``).

    Raises:
        ValueError: when no classifier is found (the message names the model type and what was
            looked for), or when ``get_classifier()`` returns several (timm's distilled models,
            whose ``head`` and ``head_dist`` both give logits: there is no one classifier).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> find_head(model)
        ('2', Linear(in_features=4, out_features=3, bias=True))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}."
        )
    prefix, inner = _unwrap(model)
    for path in _candidates(inner):
        module = inner.get_submodule(path)
        if _head_shape(module) is not None:
            return prefix + path, module
    within = f" (inside {type(model).__name__})" if inner is not model else ""
    raise ValueError(
        f"Could not find the classifier of {type(inner).__name__}{within}: looked for "
        f"{_LOOKED_FOR}, and found none that is an `nn.Linear` (or a torchcollapse head)."
    )


def replace_head(model: nn.Module, factory: Callable[[int, int], nn.Module]) -> nn.Module:
    """Replace the classifier of ``model`` by ``factory(in_features, num_classes)``, in place.

    The classifier is found by :func:`find_head`. The new head is moved to the old one's device
    and floating dtype, put where the old one was (in its parent module, by name, so an
    ``nn.Sequential`` keeps its order), and the old head is returned. Works for timm models (the
    module ``get_classifier()`` returns is replaced where it lives, so ``get_classifier()`` then
    returns the new head), torchvision models and plain ``nn.Sequential``, also inside
    ``nn.DataParallel``, ``AveragedModel`` and ``torch.compile`` wrappers (the wrapped model's
    classifier is replaced in place; a compiled model recompiles at its next call).
    ``DistributedDataParallel`` registers the parameters it synchronises when
    it is built, so a head replaced inside it would break its gradient reduction at the next
    step: it is refused (replace the head of ``ddp.module`` or of the model before wrapping,
    then wrap it again).
    An ``AveragedModel`` holds its own copy of the model: replace the head in the model and in
    the average alike.

    The training code stays as it was for heads that read only the features (``nn.Linear``,
    ``SimplexETFHead``, ``FixedFrameHead``, a ``CosineHead`` without margin). Two heads need the
    labels in training and do nothing useful when called as ``model(x)``:
    :class:`~torchcollapse.heads.NearestETFHead` moves its frame, and a ``CosineHead`` with a
    margin applies it, only when called as ``head(features, target)``; call the head yourself
    (e.g. ``model.fc = nn.Identity()`` and ``head(model(x), y)``). Both warn once when called
    twice in training mode without ``target`` before any call with one.

    Args:
        model: the model, modified in place.
        factory: called as ``factory(in_features, num_classes)`` with the old classifier's shape;
            returns the new head, e.g. ``SimplexETFHead`` or
            ``lambda d, k: SimplexETFHead(d, k, scale=10.0)``.

    Returns:
        The old classifier.

    Raises:
        ValueError: when no classifier is found, ``get_classifier()`` returns several (timm's
            distilled models: replace ``head`` and ``head_dist`` yourself), the classifier is
            a lazy module (:class:`torch.nn.LazyLinear`) not initialised yet (run one forward
            pass first), or the model is inside ``DistributedDataParallel``.
        TypeError: when ``factory`` is not callable or does not return an ``nn.Module``.

    Example:
        >>> import torch
        >>> from torchcollapse.heads import SimplexETFHead
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 5))
        >>> old = replace_head(model, SimplexETFHead)
        >>> old
        Linear(in_features=16, out_features=5, bias=True)
        >>> type(model[1]).__name__, model(torch.randn(2, 8)).shape
        ('SimplexETFHead', torch.Size([2, 5]))
    """
    if not callable(factory):
        raise TypeError(
            "Expected argument `factory` to be a callable (in_features, num_classes) -> nn.Module,"
            f" but got {type(factory).__name__}."
        )
    if _inside_ddp(model):
        raise ValueError(
            f"Expected a model not wrapped in DistributedDataParallel, but got one around "
            f"{type(_unwrap(model)[1]).__name__}: DDP registered the old head's parameters for "
            "its gradient reduction when it was built. Replace the head before wrapping (e.g. "
            "`replace_head(ddp.module, ...)` on a fresh model) and wrap the model again."
        )
    path, old = find_head(model)
    if isinstance(old, LazyModuleMixin) and old.has_uninitialized_params():
        raise ValueError(
            f"The classifier `{path}` of {type(model).__name__} is a lazy module "
            f"({type(old).__name__}) that is not initialised yet, so its `in_features` is not "
            "known: run one forward pass through the model first (it initialises the lazy "
            "layers), then call replace_head."
        )
    shape = _head_shape(old)
    assert shape is not None  # find_head only returns heads with a shape
    new = factory(*shape)
    if not isinstance(new, nn.Module):
        raise TypeError(
            f"Expected `factory` to return an nn.Module, but it returned {type(new).__name__}."
        )
    reference = next(
        (t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None
    )
    if isinstance(reference, Tensor):
        new = new.to(device=reference.device, dtype=reference.dtype)
    parent_name, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)
    return old
