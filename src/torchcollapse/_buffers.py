"""Buffers that keep their dtype when their module is cast (``.half()``, ``.to(dtype)``).

``nn.Module._apply`` converts every floating buffer with the module. Some must not follow:

- fixed constants (a fixed scale, class counts, log priors), which a float16 or bfloat16 copy
  would round (a scale of 16 becomes 16.0156) or overflow (counts beyond 65504): they keep their
  dtype under every cast;
- running statistics (running means), which stop moving once stored in 16 bits (an update
  smaller than half an ulp of the mean rounds away): they keep at least float32, their own dtype
  under casts to a narrower floating type, and widen with the module under ``.double()``.

The device always follows the module. A kept buffer is converted from the original tensor, not
from the rounded cast, unless the original is on the meta device (it holds no values): a constant
then comes from the constructor's values the module keeps, which is what rebuilds it after
``to_empty()`` from the meta device. A constant that widens with the module (``.double()`` on a
float32 buffer that is not kept under every cast) also comes from those values while the buffer
still holds them (rounded), so that it is exact in the wider dtype, not a widened rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["apply_keeping_dtypes", "restore_constant"]


def _narrow(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a floating type narrower than float32 (float16, bfloat16, ...)."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def apply_keeping_dtypes(
    module: nn.Module,
    apply: Callable[[], object],
    names: Iterable[str],
    *,
    always: bool = False,
    constants: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Run ``apply`` (the module's ``nn.Module._apply``), keeping the dtypes of its buffers
    ``names`` (absent or ``None`` buffers are skipped).

    Args:
        module: the module whose ``_apply`` runs.
        apply: the call of ``nn.Module._apply`` on it (e.g. ``partial(super()._apply, fn,
            recurse)``).
        names: names of the module's own buffers to keep.
        always: keep the dtype under every cast (fixed constants); otherwise only under casts to
            a floating type narrower than float32 (running statistics: at least float32).
        constants: the constructor's values of the buffers among ``names`` that are data of the
            constructor (give them at full precision): they are restored also when only the
            storage changed (``to_empty()`` would leave uninitialised memory), from the original
            buffer, or from these values when the original is on the meta device, or when the
            buffer widens and still holds these values (rounded to its dtype).
    """
    constants = constants or {}
    originals: dict[str, Tensor] = {}
    for name in names:
        buffer = module._buffers.get(name)
        if buffer is not None:
            originals[name] = buffer
    apply()
    for name, original in originals.items():
        moved = module._buffers.get(name)
        if moved is None:
            continue
        keep = always or (_narrow(moved.dtype) and not _narrow(original.dtype))
        dtype = original.dtype if keep else moved.dtype
        values = constants.get(name)
        if moved.dtype == dtype and values is None:
            continue
        source = original
        if original.is_meta:
            source = moved if values is None else torch.tensor(values, dtype=dtype, device="cpu")
        elif values is not None and _wider(dtype, original.dtype):
            exact = torch.tensor(values, dtype=dtype, device="cpu")
            if torch.equal(exact.to(original.dtype), original.detach().cpu()):  # not modified
                source = exact
        module._buffers[name] = source.to(device=moved.device, dtype=dtype)


def restore_constant(buffer: Tensor, values: Sequence[float]) -> None:
    """Copy the constructor's ``values`` of a constant buffer back into it (``reset_parameters``),
    rounded once from float64 to the buffer's dtype, on its device, without recording autograd."""
    with torch.no_grad():
        buffer.copy_(torch.tensor(values, dtype=torch.float64, device="cpu"))


def _wider(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether both are floating types and ``dtype`` has more bits than ``than``."""
    return (
        dtype.is_floating_point
        and than.is_floating_point
        and torch.finfo(dtype).bits > torch.finfo(than).bits
    )
