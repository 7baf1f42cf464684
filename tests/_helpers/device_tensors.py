"""Tensors that claim another device, for the tests of device handling on a CPU-only machine.

``OnDevice(tensor, "mps")`` is a tensor that reports ``device`` ``mps`` (or any device type) but
holds ``tensor``'s values on the CPU: every operation runs on the held values and gives such a
tensor again, and a copy to the CPU (``.cpu()``, ``.to("cpu")``) gives a plain CPU tensor with the
values. ``float64=False`` refuses float64 results, as Apple's MPS does ("Cannot convert a MPS
Tensor to float64 dtype"). Only tensors can be made so: a factory call naming the device
(``torch.zeros(..., device="mps")``) still needs the real device. ``OnDevice.copies_to_cpu``
counts the copies to the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["OnDevice"]


class OnDevice(Tensor):
    """A tensor on ``device`` (any type) whose values live on the CPU (see the module)."""

    held: Tensor
    float64: bool
    copies_to_cpu: ClassVar[int] = 0

    @staticmethod
    def __new__(cls, held: Tensor, device: str = "mps", *, float64: bool = False) -> OnDevice:
        if held.dtype == torch.float64 and not float64:
            raise TypeError(f"Cannot convert a {device} tensor to float64 dtype")
        made: OnDevice = Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls,
            held.shape,
            strides=held.stride(),
            dtype=held.dtype,
            device=torch.device(device),
            requires_grad=held.requires_grad,
        )
        made.held, made.float64 = held, float64
        return made

    def __init__(self, held: Tensor, device: str = "mps", *, float64: bool = False) -> None:
        super().__init__()

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnDevice({self.held!r}, {self.device})"

    @classmethod
    def __torch_dispatch__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        held = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, OnDevice)]
        device, float64 = str(held[0].device), held[0].float64
        target = kwargs.get("device")
        to_cpu = target is not None and torch.device(target).type == "cpu"
        if target is not None:
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_held, args), **tree_map(_held, kwargs))
        if to_cpu:
            OnDevice.copies_to_cpu += 1
            return out
        return tree_map(lambda t: OnDevice(t, device, float64=float64) if _plain(t) else t, out)


def _held(value: Any) -> Any:
    return value.held if isinstance(value, OnDevice) else value


def _plain(value: Any) -> bool:
    return isinstance(value, Tensor) and not isinstance(value, OnDevice)
