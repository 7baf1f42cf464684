"""Default-device contexts for the tests of code that must draw on the CPU whatever the default.

``foreign_default_device()`` stands in for ``with torch.device("cuda")`` on a machine without an
accelerator: a factory call that names no device makes a tensor on the meta device (no values,
so a computation that reads one fails), and one that draws from a generator without naming a
device raises, as a CPU generator does with a CUDA tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

__all__ = ["foreign_default_device"]


class _ForeignDefaultDevice(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _device_constructors() and kwargs.get("device") is None:
            if kwargs.get("generator") is not None:
                raise RuntimeError(
                    f"{getattr(func, '__name__', func)} with a CPU generator on the default "
                    "(non-CPU) device"
                )
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def foreign_default_device() -> TorchFunctionMode:
    """A context in which tensor factories default to a device other than the CPU."""
    return _ForeignDefaultDevice()
