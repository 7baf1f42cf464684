"""Fixed-frame heads, the scale helpers and the ETF initialiser."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests._helpers.devices import foreign_default_device
from tests._helpers.testers import check_module, check_symbolic_trace
from torchcollapse.frames import hierarchy_frame, orthogonal_frame, simplex_etf, spherical_code
from torchcollapse.heads import (
    DEFAULT_LOSS_FLOOR,
    CosineHead,
    FixedFrameHead,
    OrthogonalFrameHead,
    SimplexETFHead,
    SphericalCodeHead,
    cross_entropy_floor,
    etf_init_,
    scale_for_loss_floor,
)

F64 = torch.float64


def features(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_logits(
    frame: torch.Tensor,
    h: torch.Tensor,
    scale: float,
    normalize: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Brute force: one dot product per (sample, class), in float64."""
    frame, h = frame.detach().double(), h.detach().double()
    bias = None if bias is None else bias.detach()
    out = torch.empty(h.shape[0], frame.shape[0], dtype=F64)
    for i in range(h.shape[0]):
        x = h[i] / h[i].norm() if normalize else h[i]
        for c in range(frame.shape[0]):
            out[i, c] = scale * float(frame[c] @ x) + (0.0 if bias is None else float(bias[c]))
    return out


# ------------------------------------------------------------------------------------------------
# The shared module tester
# ------------------------------------------------------------------------------------------------

HEAD_FACTORIES = {
    "simplex": lambda: SimplexETFHead(16, 5),  # K <= d: logits rescaled
    "simplex_minimal_learnable_bias": lambda: SimplexETFHead(
        4, 5, scale=4.0, learnable_scale=True, bias=True
    ),
    "simplex_unnormalized": lambda: SimplexETFHead(16, 5, normalize_features=False, scale=0.5),
    "spherical_code": lambda: SphericalCodeHead(3, 12, steps=50),  # K > d: features rescaled
    "orthogonal": lambda: OrthogonalFrameHead(8, 4, bias=True),
    "hierarchy": lambda: FixedFrameHead(
        hierarchy_frame(torch.tensor([[1.0, 0.6, -0.2], [0.6, 1.0, -0.2], [-0.2, -0.2, 1.0]]), 6)
    ),
}


# the same heads built with another scale: a loaded state_dict gives them the saved one
OTHER_SCALE_FACTORIES = {
    "simplex": lambda: SimplexETFHead(16, 5, scale=3.0),
    "simplex_minimal_learnable_bias": lambda: SimplexETFHead(
        4, 5, scale=9.0, learnable_scale=True, bias=True
    ),
    "simplex_unnormalized": lambda: SimplexETFHead(16, 5, normalize_features=False, scale=2.0),
    "spherical_code": lambda: SphericalCodeHead(3, 12, steps=50, scale=1.5),
    "orthogonal": lambda: OrthogonalFrameHead(8, 4, bias=True, scale=2.5),
    "hierarchy": lambda: FixedFrameHead(torch.randn(3, 6), scale=0.25),
}


@pytest.mark.parametrize("name", list(HEAD_FACTORIES))
def test_fixed_heads_pass_the_module_tester(name: str) -> None:
    factory = HEAD_FACTORIES[name]
    d = factory().in_features
    check_module(factory, (features(7, d),), load_into=[OTHER_SCALE_FACTORIES[name]])


def test_simplex_head_compiles_with_inductor() -> None:
    check_module(
        lambda: SimplexETFHead(16, 5, learnable_scale=True, bias=True),
        (features(7, 16),),
        gradcheck=False,
        compile_backend="inductor",
        dtypes=(torch.float32,),
    )


# ------------------------------------------------------------------------------------------------
# Forward against a brute-force loop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "d"), [(5, 16), (12, 3)])  # both orders of the rescaling
@pytest.mark.parametrize("normalize", [True, False])
def test_fixed_head_forward_matches_brute_force(k: int, d: int, normalize: bool) -> None:
    frame = spherical_code(k, d, steps=20, dtype=F64)
    head = FixedFrameHead(frame, normalize_features=normalize, scale=3.0, bias=True)
    with torch.no_grad():
        head.bias.copy_(torch.linspace(-1, 1, k, dtype=F64))  # type: ignore[union-attr]
    h = features(9, d, dtype=F64) * 5.0
    expected = reference_logits(frame, h, 3.0, normalize, head.bias)
    # float64 all the way: a few ulps
    torch.testing.assert_close(head(h), expected, rtol=1e-12, atol=1e-12)
    # any leading shape, as nn.Linear
    batched = head(h.reshape(3, 3, d))
    torch.testing.assert_close(batched, expected.reshape(3, 3, k), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7,), (2, 4)])
def test_fused_gradients_match_autograd_through_the_formula(shape: tuple[int, ...]) -> None:
    # The fused backward of the normalized head against autograd through the plain formula
    # scale * W h / max(||h||, eps), in float64, for the features, a learnable weight and a
    # learnable scale; one row below eps (clamped: the map is linear there) and one zero row.
    from torchcollapse.heads._common import normalized_linear

    eps = 1e-3
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, 6, generator=gen, dtype=F64)
    h.view(-1, 6)[0] *= 1e-4 / h.view(-1, 6)[0].norm()  # norm 1e-4 < eps
    h.view(-1, 6)[1] = 0.0
    weight = torch.randn(5, 6, generator=gen, dtype=F64)
    log_scale = torch.tensor(1.3, dtype=F64)
    upstream = torch.randn(*shape, 5, generator=gen, dtype=F64)
    grads = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (h, weight, log_scale)]
        x, w, s = leaves
        if fused:
            out = normalized_linear(x, w, s.exp(), eps)
        else:
            out = s.exp() * F.linear(x, w) / x.norm(dim=-1, keepdim=True).clamp_min(eps)
        (out * upstream).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, expected in zip(*grads):
        # float64 and a handful of operations: agreement to a few ulps of the largest entry
        torch.testing.assert_close(
            got,
            expected,
            rtol=1e-12,
            atol=1e-12 * float(expected.abs().max()),
            msg=lambda m: f"seed {seed}: {m}",
        )


def test_learnable_scale_is_learned_in_log_space() -> None:
    head = SimplexETFHead(8, 4, scale=2.0, learnable_scale=True, dtype=F64)
    assert [name for name, _ in head.named_parameters()] == ["log_scale"]
    assert head.log_scale is not None
    assert head.log_scale.item() == pytest.approx(math.log(2.0))
    h = features(6, 8, dtype=F64)
    torch.testing.assert_close(head(h), reference_logits(head.frame, h, 2.0, True))
    head(h).sum().backward()
    assert head.log_scale is not None
    assert head.log_scale.grad is not None
    assert head.frame.grad is None
    assert not head.frame.requires_grad


def test_weight_is_the_effective_classifier_and_the_shape_attributes() -> None:
    head = SimplexETFHead(10, 4, scale=5.0)
    torch.testing.assert_close(head.weight, 5.0 * head.frame)
    torch.testing.assert_close(head.effective_weight, head.weight)
    assert (head.in_features, head.num_classes, head.out_features) == (10, 4, 4)
    h = features(3, 10)
    torch.testing.assert_close(head(h), F.linear(F.normalize(h, dim=1), head.weight))
    assert repr(head) == (
        "SimplexETFHead(in_features=10, num_classes=4, normalize_features=True, scale=5.0, "
        "learnable_scale=False, bias=False)"
    )


@pytest.mark.parametrize("learnable", [False, True])
def test_repr_shows_the_scale_to_six_significant_digits(learnable: bool) -> None:
    import re

    # float32 log_scale: exp(log(s)) within a few ulps of s, so 6 digits come back as given
    for scale, shown in ((1e-7, "1e-07"), (2.5e-7, "2.5e-07"), (123456789.0, "123457000.0")):
        for head in (
            SimplexETFHead(8, 4, scale=scale, learnable_scale=learnable),
            CosineHead(8, 4, scale=scale, learnable_scale=learnable),
        ):
            found = re.search(r"scale=([^,]+),", repr(head))
            assert found is not None
            assert found.group(1) == shown, repr(head)
            assert float(found.group(1)) == pytest.approx(scale, rel=5e-6)
    head = SimplexETFHead(8, 4, scale=9.103456789, learnable_scale=learnable)
    assert "scale=9.10346," in repr(head)


def test_default_scale_follows_the_loss_floor() -> None:
    for k in (2, 10):
        expected = scale_for_loss_floor(DEFAULT_LOSS_FLOOR, k)
        assert SimplexETFHead(k, k).scale == pytest.approx(expected)
    expected = scale_for_loss_floor(DEFAULT_LOSS_FLOOR, 1000)
    assert FixedFrameHead(torch.eye(1000, 4)).scale == pytest.approx(expected)
    assert SimplexETFHead(8, 4, normalize_features=False).scale == 1.0


def test_frame_is_a_persistent_buffer_moved_by_to_and_saved() -> None:
    head = SimplexETFHead(8, 4, bias=True)
    assert set(head.state_dict()) == {"frame", "bias", "_extra_state"}  # extra state: the scale
    assert torch.equal(head.state_dict()["frame"], simplex_etf(4, 8))
    assert head.to(F64).frame.dtype == F64
    assert head.to("meta").frame.device.type == "meta"
    # built directly on a device / in a dtype
    made = SimplexETFHead(8, 4, device="meta", dtype=torch.bfloat16)
    assert (made.frame.device.type, made.frame.dtype) == ("meta", torch.bfloat16)
    kept = FixedFrameHead(simplex_etf(3, 4, dtype=F64))
    assert kept.frame.dtype == F64  # FixedFrameHead keeps the frame's dtype by default


FIXED_SCALE_HEADS: dict[str, Callable[..., FixedFrameHead]] = {
    "simplex": lambda d, k, **kw: SimplexETFHead(d, k, **kw),
    "orthogonal": lambda d, k, **kw: OrthogonalFrameHead(d, k, **kw),
    "spherical_code": lambda d, k, **kw: SphericalCodeHead(d, k, steps=20, **kw),
    # a frame given as data: the constructor's frame is replaced by the loaded one
    "fixed_frame": lambda d, k, **kw: FixedFrameHead(torch.randn(k, d, dtype=F64), **kw),
}


@pytest.mark.parametrize("kind", list(FIXED_SCALE_HEADS))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_a_fixed_scale_round_trips_through_state_dict(
    kind: str, normalize: bool, bias: bool
) -> None:
    import io

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    gen = torch.Generator().manual_seed(seed)
    k, d = 5, 6
    saved_scale = float(torch.empty((), dtype=F64).uniform_(0.1, 40.0, generator=gen))
    other_scale = saved_scale * 2.0 + 1.0
    make = FIXED_SCALE_HEADS[kind]
    options = {"normalize_features": normalize, "bias": bias, "dtype": F64}
    saved = make(d, k, scale=saved_scale, **options)
    if saved.bias is not None:
        with torch.no_grad():
            saved.bias.copy_(torch.randn(k, generator=gen, dtype=F64))
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    loaded = make(d, k, scale=other_scale, **options)
    assert str(loaded.load_state_dict(torch.load(buffer, weights_only=True))) == (
        "<All keys matched successfully>"
    )
    assert loaded.scale == saved_scale, f"seed {seed}"  # exactly: a float64 of the Python float
    assert type(loaded.scale) is float  # the forward pass still multiplies by a Python float
    h = torch.randn(9, d, generator=gen, dtype=F64) * 3.0
    torch.testing.assert_close(loaded(h), saved(h), rtol=0, atol=0, msg=f"seed {seed}")
    # against the brute force at the saved scale: float64, a few ulps of logits up to ~40 * |h|
    expected = reference_logits(saved.frame, h, saved_scale, normalize, saved.bias)
    torch.testing.assert_close(loaded(h), expected, rtol=1e-12, atol=1e-11, msg=f"seed {seed}")
    # and reset_parameters keeps the loaded scale
    loaded.reset_parameters()
    assert loaded.scale == saved_scale


def test_scale_in_state_dict_old_checkpoints_and_errors() -> None:
    head = SimplexETFHead(8, 4, scale=6.0, bias=True)
    saved = head.state_dict()
    scale_entry = saved["_extra_state"]
    assert (scale_entry.dtype, scale_entry.device.type, scale_entry.shape) == (F64, "cpu", ())
    # a learnable scale comes from log_scale; the extra state is the initial value
    learnable = SimplexETFHead(8, 4, scale=6.0, learnable_scale=True)
    with torch.no_grad():
        learnable.log_scale.fill_(math.log(11.0))  # type: ignore[union-attr]
    restored = SimplexETFHead(8, 4, scale=2.0, learnable_scale=True)
    restored.load_state_dict(learnable.state_dict())
    assert restored._current_scale() == pytest.approx(11.0, rel=1e-6)
    restored.reset_parameters()
    assert restored._current_scale() == pytest.approx(6.0, rel=1e-6)
    # a state_dict from before the scale was saved (version 1) loads strictly, scale kept
    old = type(saved)((key, value) for key, value in saved.items() if key != "_extra_state")
    old._metadata = type(saved._metadata)({"": {"version": 1}})  # type: ignore[attr-defined]
    target = SimplexETFHead(8, 4, scale=3.0, bias=True)
    target.load_state_dict(old)
    assert target.scale == 3.0
    target.load_state_dict(dict(old))  # no metadata: as old
    # in a model: the prefix and the metadata of the submodule
    model = nn.Sequential(nn.Linear(8, 8), SimplexETFHead(8, 4, scale=5.0))
    other = nn.Sequential(nn.Linear(8, 8), SimplexETFHead(8, 4, scale=1.0))
    other.load_state_dict(model.state_dict())
    assert other[1].scale == 5.0
    # a current state_dict without the scale is missing a key, as any state_dict would be
    new_without = type(saved)((key, value) for key, value in saved.items() if key != "_extra_state")
    new_without._metadata = saved._metadata  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match=r"Missing key.*_extra_state"):
        target.load_state_dict(new_without)
    for bad in (torch.tensor(-1.0, dtype=F64), torch.tensor(math.nan), "x"):
        broken = dict(saved)
        broken["_extra_state"] = bad
        with pytest.raises(ValueError, match=r"saved scale \(`_extra_state`\) of SimplexETFHead"):
            target.load_state_dict(broken)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_normalization_is_safe_in_low_precision(dtype: torch.dtype) -> None:
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    head = SimplexETFHead(8, 4, scale=30.0, dtype=dtype)
    h = torch.zeros(36, 8, dtype=dtype)
    h[1, 0] = torch.finfo(dtype).tiny  # the smallest normal number
    h[2] = 1e4 if dtype != torch.float16 else 3e2  # large features (8 * 300^2 overflows float16)
    h[3:] = features(33, 8, seed=seed).to(dtype)
    logits = head(h)
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    assert torch.equal(logits[0], torch.zeros(4, dtype=dtype))  # a zero feature: zero logits
    expected = reference_logits(head.frame, h[2:].double(), 30.0, True)
    # Error of a logit (at most 30 in magnitude), in units of 30 * eps of the dtype (features and
    # frame are the same rounded values in both): float16 and bfloat16 round the product x W^T
    # (an 8-term sum) once to the dtype, rescale it in float32 and round the logit once more, at
    # most about eps in all (measured: <= 0.7 over 40000 random rows); allowed 2 eps, the
    # 8 (bfloat16) or 11 (float16) bits they carry. float32 rounds at every step in its own
    # precision (the 8-term product, the 8-term norm, the division, the rescaling): measured
    # <= 1.8 eps, allowed 8 eps (~3e-5). A 1% error on the logits exceeds both float16 and float32
    # tolerances.
    units = 8 if dtype == torch.float32 else 2
    atol = 30 * units * torch.finfo(dtype).eps
    torch.testing.assert_close(
        logits[2:].double(), expected, rtol=0, atol=atol, msg=lambda m: f"seed {seed}: {m}"
    )


def test_fixed_head_errors() -> None:
    with pytest.raises(
        ValueError, match=r"last dimension 8 \(`in_features`\), but got shape \(3, 7\)"
    ):
        SimplexETFHead(8, 4)(torch.randn(3, 7))
    with pytest.raises(TypeError, match="`frame` to be a Tensor"):
        FixedFrameHead([[1.0, 0.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D tensor"):
        FixedFrameHead(torch.ones(3))
    with pytest.raises(ValueError, match="finite floating-point"):
        FixedFrameHead(torch.tensor([[1.0, math.inf], [0.0, 1.0]]))
    with pytest.raises(TypeError, match=r"`dtype` to be a floating dtype, but got torch\.int64"):
        FixedFrameHead(simplex_etf(3, 4), dtype=torch.int64)  # at construction, not forward
    with pytest.raises(ValueError, match="`scale` to be a finite number > 0"):
        SimplexETFHead(8, 4, scale=0.0)
    with pytest.raises(ValueError, match="`eps` to be > 0"):
        SimplexETFHead(8, 4, eps=0.0)
    with pytest.raises(
        ValueError, match=r"`in_features` to be at least .* SphericalCodeHead\(3, 10\)"
    ):
        SimplexETFHead(3, 10)
    with pytest.raises(ValueError, match=r"`in_features` to be at least `num_classes` = 5"):
        OrthogonalFrameHead(4, 5)
    with pytest.raises(TypeError, match="`eps` to be a real number, but got NoneType"):
        SimplexETFHead(8, 4, eps=None)  # type: ignore[arg-type]
    for make in (SimplexETFHead, OrthogonalFrameHead, SphericalCodeHead):
        with pytest.raises(TypeError, match=r"`generator` to be a torch\.Generator or None"):
            make(8, 4, generator=42)  # type: ignore[arg-type]
    # a fixed-frame head's `weight` is computed from its frame: filling it would do nothing
    fixed = OrthogonalFrameHead(16, 5, bias=True)
    with pytest.raises(TypeError, match="computed on access"):
        etf_init_(fixed)
    # a parametrized weight is computed by its parametrization, not kept as a frame
    for parametrization in (
        nn.utils.parametrizations.weight_norm,
        nn.utils.parametrizations.spectral_norm,
        nn.utils.parametrizations.orthogonal,
    ):
        with pytest.raises(TypeError, match="computed by a parametrization"):
            etf_init_(parametrization(nn.Linear(16, 5)))
    with pytest.raises(ValueError, match="`num_classes` to be at least 2"):
        SimplexETFHead(3, 1)
    with pytest.raises(TypeError, match="`features` to be floating point"):
        SimplexETFHead(3, 2)(torch.ones(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny training loops: one thread avoids contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_mlp_with_a_simplex_head_learns_a_separable_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    k, d, n = 5, 10, 200
    centres = 4.0 * torch.randn(k, d, generator=gen)
    target = torch.arange(n) % k
    x = centres[target] + torch.randn(n, d, generator=gen)
    # the problem is separable: nearest centre classifies every point
    assert torch.equal(torch.cdist(x, centres).argmin(1), target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 8), SimplexETFHead(8, k))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    assert torch.equal(model(x).argmax(1), target)
    assert all(p.grad is not None for p in model[:-1].parameters())
    assert len(list(model[-1].parameters())) == 0  # nothing to learn in the head


# ------------------------------------------------------------------------------------------------
# Scale helpers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5, 100])
def test_cross_entropy_floor_is_the_minimum_over_unit_features(k: int) -> None:
    scale = 4.0
    head = SimplexETFHead(k - 1, k, scale=scale, dtype=F64)
    floor = cross_entropy_floor(scale, k)
    # at h = w_y the loss is the closed form
    at_vertex = F.cross_entropy(head(head.frame), torch.arange(k), reduction="none")
    torch.testing.assert_close(at_vertex, torch.full((k,), floor, dtype=F64), rtol=1e-12, atol=0)
    # no unit feature does better: random directions, and directions around the class vector
    gen = torch.Generator().manual_seed(1)
    anywhere = torch.randn(2048, k - 1, generator=gen, dtype=F64)
    nearby = [
        head.frame[0] + radius * torch.randn(512, k - 1, generator=gen, dtype=F64)
        for radius in (1e-5, 1e-3, 1e-1, 1.0)
    ]
    h = torch.cat([anywhere, *nearby])
    losses = F.cross_entropy(head(h), torch.zeros(h.shape[0], dtype=torch.long), reduction="none")
    assert float(losses.min()) >= floor - 1e-12
    # and the closest probes come within the rounding of the perturbation (second order: 1e-6)
    assert float(losses.min()) == pytest.approx(floor, rel=1e-5)


def test_scale_for_loss_floor_inverts_the_floor() -> None:
    for k in (2, 10, 1000):
        for floor in (1e-6, 1e-2, 0.5, math.log(k) * 0.99):
            scale = scale_for_loss_floor(floor, k)
            assert cross_entropy_floor(scale, k) == pytest.approx(floor, rel=1e-10)
    assert cross_entropy_floor(0.0, 7) == pytest.approx(math.log(7))
    with pytest.raises(ValueError, match=r"`loss_floor` to be in \(0, log\(num_classes\)\)"):
        scale_for_loss_floor(math.log(10), 10)
    with pytest.raises(ValueError, match="`scale` to be a number >= 0"):
        cross_entropy_floor(-1.0, 10)
    with pytest.raises(ValueError, match="`num_classes` to be at least 2"):
        cross_entropy_floor(1.0, 1)


def test_scale_helpers_read_any_real_scalar_as_the_heads_do() -> None:
    import warnings

    import numpy as np

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(2, 50, (), generator=gen))
    scale = float(torch.empty((), dtype=F64).uniform_(0.5, 20.0, generator=gen))
    # a learnable head's scale, a 0-dim tensor that requires grad (no warning on reading it)
    head = SimplexETFHead(k, k, scale=scale, learnable_scale=True, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        floor = cross_entropy_floor(head.scale, head.num_classes)
    assert type(floor) is float
    # independent reference: the cross-entropy of the class vector itself, in float64, where
    # logsumexp minus the target logit (both ~ scale) cancels to ~ scale * 2**-52 absolute
    at_vertex = F.cross_entropy(head(head.frame[:1]), torch.zeros(1, dtype=torch.long))
    tolerance = 64 * scale * torch.finfo(F64).eps
    assert floor == pytest.approx(float(at_vertex.detach()), rel=1e-12, abs=tolerance), seed
    for wrapped in (np.float32(8.0), np.float64(8.0), np.int64(8), torch.tensor(8.0)):
        assert cross_entropy_floor(wrapped, np.int64(k)) == cross_entropy_floor(8.0, k)  # type: ignore[arg-type]
    for wrapped in (np.float32(0.25), torch.tensor(0.25, dtype=F64)):
        # float32(0.25) is exact: the same scale as from the Python float
        assert scale_for_loss_floor(wrapped, torch.tensor(k)) == scale_for_loss_floor(0.25, k)  # type: ignore[arg-type]
    assert scale_for_loss_floor(np.float32(0.01), 10) == pytest.approx(
        scale_for_loss_floor(0.01, 10), rel=1e-6
    )
    # a wrong type is a type error, a value out of range a value error, naming the argument
    for bad in (True, np.bool_(False), torch.tensor(True), "1.0", None, 1j, torch.ones(2)):
        with pytest.raises(TypeError, match="`scale` to be a real number"):
            cross_entropy_floor(bad, 10)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="`loss_floor` to be a real number"):
            scale_for_loss_floor(bad, 10)  # type: ignore[arg-type]
    for bad_scale in (-1.0, np.float32(-0.5), math.nan, torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="`scale` to be a number >= 0"):
            cross_entropy_floor(bad_scale, 10)  # type: ignore[arg-type]
    for bad_floor in (0.0, math.log(10), np.float64(3.0), math.nan, math.inf, torch.tensor(-1.0)):
        with pytest.raises(ValueError, match=r"`loss_floor` to be in \(0, log\(num_classes\)\)"):
            scale_for_loss_floor(bad_floor, 10)  # type: ignore[arg-type]
    assert cross_entropy_floor(math.inf, 10) == 0.0  # the limit, as before


# ------------------------------------------------------------------------------------------------
# etf_init_
# ------------------------------------------------------------------------------------------------


def test_etf_init_linear_tensor_and_cosine_head() -> None:
    linear = nn.Linear(6, 7, dtype=F64)  # the minimal d = K - 1
    assert etf_init_(linear, gain=2.0) is linear
    expected = 4.0 * (7 / 6) * (torch.eye(7, dtype=F64) - 1 / 7)
    torch.testing.assert_close(linear.weight @ linear.weight.T, expected, rtol=0, atol=1e-12)
    assert torch.equal(linear.bias, torch.zeros(7, dtype=F64))
    assert linear.weight.requires_grad
    assert linear.weight.grad_fn is None
    tensor = torch.empty(3, 5, dtype=F64)
    assert etf_init_(tensor) is tensor
    torch.testing.assert_close(tensor, simplex_etf(3, 5, dtype=F64))
    cosine = etf_init_(CosineHead(5, 3, dtype=F64))
    torch.testing.assert_close(cosine.weight.detach(), simplex_etf(3, 5, dtype=F64))
    seeded = etf_init_(torch.empty(3, 5), generator=torch.Generator().manual_seed(3))
    assert (seeded - simplex_etf(3, 5)).abs().max() > 1e-3
    with pytest.raises(
        ValueError, match=r"`in_features` \(2\) to be at least `num_classes - 1` \(4\)"
    ):
        etf_init_(nn.Linear(2, 5))
    with pytest.raises(TypeError, match="module with a `weight` tensor"):
        etf_init_(nn.ReLU())
    with pytest.raises(ValueError, match="2-D floating-point"):
        etf_init_(torch.empty(3))


def test_orthogonal_head_frame() -> None:
    head = OrthogonalFrameHead(6, 4, dtype=F64)
    torch.testing.assert_close(head.frame, orthogonal_frame(4, 6, dtype=F64))


def test_normalized_head_under_bfloat16_autocast_matches_float32() -> None:
    # Under autocast the matrix product runs in bfloat16 while the features, the norms and the
    # feature gradient stay float32. bfloat16 keeps 8 bits: logits and gradients agree with the
    # float32 computation to a few 2**-8 of their largest entry.
    head = SimplexETFHead(24, 6, scale=10.0)
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    h = features(32, 24, seed=seed)
    x_auto, x_ref = h.clone().requires_grad_(), h.clone().requires_grad_()
    upstream = torch.randn(32, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x_auto)
    assert logits.dtype == torch.bfloat16
    (logits.float() * upstream).sum().backward()
    reference = head(x_ref)
    (reference * upstream).sum().backward()
    assert x_auto.grad is not None
    assert x_ref.grad is not None
    assert x_auto.grad.dtype == torch.float32
    for got, expected in ((logits.float(), reference.detach()), (x_auto.grad, x_ref.grad)):
        scale = float(expected.abs().max())
        torch.testing.assert_close(
            got.detach(),
            expected,
            rtol=0,
            atol=4 * 2**-8 * scale,
            msg=lambda m: f"seed {seed}: {m}",
        )


@pytest.mark.parametrize("learnable", [False, True])
def test_bfloat16_features_under_autocast_reach_float32_parameters(learnable: bool) -> None:
    # A backbone under autocast hands bfloat16 features to a float32 head: the backward pass
    # must multiply in one dtype and give the float32 parameters float32 gradients close to a
    # float32 computation on the same (rounded) features; bfloat16 keeps 8 bits.
    head: nn.Module = CosineHead(24, 6) if learnable else SimplexETFHead(24, 6, scale=10.0)
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    h = features(16, 24, seed=seed).bfloat16()
    upstream = torch.randn(16, 6)
    x = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (head(x).float() * upstream).sum().backward()
    grads = {name: p.grad for name, p in head.named_parameters()}
    head.zero_grad()
    reference = h.float().requires_grad_()
    (head(reference) * upstream).sum().backward()
    assert x.grad is not None
    assert reference.grad is not None
    assert x.grad.dtype == torch.bfloat16
    pairs = [(x.grad.float(), reference.grad)]
    for name, p in head.named_parameters():
        assert grads[name] is not None
        assert grads[name].dtype == torch.float32, name
        pairs.append((grads[name], p.grad))
    for got, expected in pairs:
        assert expected is not None
        scale = float(expected.abs().max())
        torch.testing.assert_close(
            got, expected, rtol=0, atol=8 * 2**-8 * scale, msg=lambda m: f"seed {seed}: {m}"
        )


def test_float16_gradient_of_small_features_is_accurate() -> None:
    # (g . out) / ||h||^2 exceeds float16's range for small features whose gradient does not:
    # the correction is formed in float32. Reference: float64 autograd through the plain formula
    # on the same float16 values; float16 keeps 11 bits.
    head = SimplexETFHead(32, 8, scale=10.0)
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(6, 32, generator=gen)
    norms = torch.tensor([1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1.0])
    h = (direction / direction.norm(dim=1, keepdim=True) * norms[:, None]).half()
    upstream = 1e-3 * torch.randn(6, 8, generator=gen)  # batch-averaged cross-entropy scale
    x = h.clone().requires_grad_()
    (head.half()(x).float() * upstream).sum().backward()
    ref = h.double().requires_grad_()
    frame = head.frame.double()
    logits = 10.0 * F.linear(ref, frame) / ref.norm(dim=1, keepdim=True)
    (logits * upstream.double()).sum().backward()
    assert x.grad is not None
    assert ref.grad is not None
    error = (x.grad.double() - ref.grad).norm(dim=1) / ref.grad.norm(dim=1)
    assert float(error.max()) < 8 * 2**-11, (seed, error)


@pytest.mark.parametrize("kind", ["etf", "cosine", "nearest"])
def test_logits_may_be_edited_in_place_before_backward(kind: str) -> None:
    # As with nn.Linear: temperature scaling or masking the returned logits in place must not
    # break the backward pass (the head keeps its own copy of what the backward needs).
    from torchcollapse.heads import NearestETFHead

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    heads = {
        "etf": lambda: SimplexETFHead(12, 5, scale=4.0, dtype=F64),
        "cosine": lambda: CosineHead(12, 5, dtype=F64),
        "nearest": lambda: NearestETFHead(12, 5, dtype=F64),
    }
    head = heads[kind]().eval()  # the same logits as in training without targets, no warning
    h = features(8, 12, seed=seed, dtype=F64)
    x_edit, x_ref = h.clone().requires_grad_(), h.clone().requires_grad_()
    logits = head(x_edit)
    logits /= 2.0
    logits[:, 0] = -math.inf  # masks a class
    logits[:, 1:].sum().backward()
    reference = head(x_ref) / 2.0
    reference[:, 1:].sum().backward()
    assert x_edit.grad is not None
    assert x_ref.grad is not None
    torch.testing.assert_close(x_edit.grad, x_ref.grad, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def _gradient_penalty_grad(
    head: Callable[[torch.Tensor], torch.Tensor], backbone: nn.Linear, x: torch.Tensor
) -> torch.Tensor:
    """Gradient, with respect to the backbone's weight, of a gradient penalty on the input."""
    target = torch.arange(x.shape[0]) % 5
    loss = F.cross_entropy(head(backbone(x)), target)
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    (grad_weight,) = torch.autograd.grad(grad_x.square().sum(), backbone.weight)
    return grad_weight


@pytest.mark.parametrize("kind", ["etf", "fixed", "cosine", "nearest"])
def test_double_backward_through_a_normalizing_head_raises(kind: str) -> None:
    # The fused backward is first-order: a gradient penalty through a backbone would otherwise
    # silently leave out the head's second-order terms (the backbone's own terms still flow).
    from torchcollapse.heads import NearestETFHead

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    heads = {
        "etf": lambda: SimplexETFHead(12, 5, scale=4.0, dtype=F64),
        "fixed": lambda: FixedFrameHead(orthogonal_frame(5, 12, dtype=F64), scale=4.0),
        "cosine": lambda: CosineHead(12, 5, dtype=F64),
        "nearest": lambda: NearestETFHead(12, 5, dtype=F64).eval(),
    }
    head = heads[kind]()
    backbone = nn.Linear(7, 12, dtype=F64)
    x = features(10, 7, seed=seed, dtype=F64).requires_grad_()
    with pytest.raises(RuntimeError, match=r"first-order backward.*create_graph=True"):
        _gradient_penalty_grad(head, backbone, x)
    # first-order training is untouched
    F.cross_entropy(head(backbone(x)), torch.arange(10) % 5).backward()
    assert backbone.weight.grad is not None


def test_double_backward_through_an_unnormalized_head_is_exact() -> None:
    # without normalization the head is a plain product: a gradient penalty through it matches
    # autograd through an independent float64 reference (same maths, a few ulps apart)
    seed = int(torch.randint(0, 2**31, ()))
    head = SimplexETFHead(12, 5, normalize_features=False, scale=2.0, dtype=F64)
    frame = head.frame.clone()
    backbone = nn.Linear(7, 12, dtype=F64)
    x = features(10, 7, seed=seed, dtype=F64).requires_grad_()
    got = _gradient_penalty_grad(head, backbone, x)
    expected = _gradient_penalty_grad(lambda h: 2.0 * h @ frame.T, backbone, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")


def test_bias_keeps_the_autocast_dtype_and_meta_construction_works() -> None:
    heads = [
        SimplexETFHead(16, 5, bias=True),
        SimplexETFHead(16, 5, normalize_features=False, bias=True),
        SimplexETFHead(16, 5, normalize_features=False, scale=2.0, bias=True),
        SimplexETFHead(16, 5, normalize_features=False, learnable_scale=True, bias=True),
    ]
    for head in heads:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert head(torch.randn(2, 16)).dtype == torch.bfloat16, repr(head)  # as nn.Linear
    with torch.device("meta"):
        meta = SimplexETFHead(16, 5, learnable_scale=True, bias=True)
    assert meta.frame.is_meta
    assert "SimplexETFHead(" in repr(meta)
    assert CosineHead(16, 5, device="meta").weight.is_meta
    assert "CosineHead(" in repr(CosineHead(16, 5, learnable_scale=True, device="meta"))


@pytest.mark.parametrize("kind", ["etf", "cosine"])
def test_torch_func_vmap_and_per_sample_gradients(kind: str) -> None:
    # torch.func (vmap, grad; per-sample gradients as in differential privacy) through the
    # fused normalized product: against a loop of plain autograd calls, one sample at a time.
    from torch.func import functional_call, grad, vmap

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    torch.manual_seed(seed)
    if kind == "etf":
        head: nn.Module = SimplexETFHead(12, 4, learnable_scale=True, bias=True, dtype=F64)
    else:
        head = CosineHead(12, 4, dtype=F64)
    x = features(5, 12, seed=seed, dtype=F64)
    batched = vmap(head)(x[:, None])
    torch.testing.assert_close(batched[:, 0], head(x), rtol=1e-12, atol=1e-12)
    params = {name: p.detach() for name, p in head.named_parameters()}

    def loss(p: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return functional_call(head, p, (sample[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        head.zero_grad()
        head(x[i : i + 1]).square().sum().backward()
        for name, p in head.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(
                per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12, msg=f"seed {seed}, {name}"
            )


def test_float16_autocast_with_large_float32_features_keeps_finite_gradients() -> None:
    # x W^T is ||x|| / scale times the logits: under float16 autocast its product with the
    # upstream gradient must not overflow (the backward takes it in float32).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    h = features(8, 64, seed=seed) * 200.0
    # large upstream gradients (a loss scale); not constant: the ETF's rows sum to zero
    upstream = 300.0 * features(8, 5, seed=seed + 1)
    head = SimplexETFHead(64, 5, scale=16.0)
    x = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        logits = head(x)
    (logits.float() * upstream).sum().backward()
    exact = h.double().requires_grad_()
    reference = SimplexETFHead(64, 5, scale=16.0, dtype=F64)
    reference.frame.copy_(head.frame.double())
    (reference(exact) * upstream.double()).sum().backward()
    assert x.grad is not None
    assert exact.grad is not None
    assert torch.isfinite(x.grad).all(), f"seed {seed}"
    # float16 products (2**-11 relative) of the logits and the feature gradient
    atol = 4e-3 * float(exact.grad.abs().max())
    torch.testing.assert_close(
        x.grad.double(), exact.grad, rtol=1e-2, atol=atol, msg=f"seed {seed}"
    )


def test_number_arguments_accept_numpy_scalars_and_0_dim_tensors() -> None:
    import numpy as np

    assert SimplexETFHead(4, 3, eps=np.float32(1e-3)).eps == pytest.approx(1e-3)
    assert CosineHead(4, 3, eps=torch.tensor(1e-3)).eps == pytest.approx(1e-3)
    # sizes: any integer (as nn.Linear), read as Python ints; the frame is the same
    for make in (SimplexETFHead, OrthogonalFrameHead, SphericalCodeHead, CosineHead):
        head = make(np.int64(8), torch.tensor(4))  # type: ignore[arg-type]
        assert (type(head.in_features), type(head.num_classes)) == (int, int), make.__name__
        assert (head.in_features, head.num_classes) == (8, 4)
    assert torch.equal(SimplexETFHead(np.int32(8), np.int64(4)).frame, simplex_etf(4, 8))  # type: ignore[arg-type]
    # scales: any real scalar, read as a Python float
    for scale in (np.float32(4.0), torch.tensor(4.0), np.int64(4), 4):
        head = SimplexETFHead(8, 4, scale=scale)  # type: ignore[arg-type]
        assert head._scale == 4.0
        assert type(head._scale) is float
        assert CosineHead(8, 4, scale=scale)._scale == 4.0  # type: ignore[arg-type]
    # bools are refused, as before; non-finite scales are value errors
    for flag in (True, np.bool_(True), torch.tensor(True)):
        with pytest.raises(TypeError, match="`num_classes` to be an int"):
            SimplexETFHead(8, flag)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="`scale` to be a real number"):
            SimplexETFHead(8, 4, scale=flag)  # type: ignore[arg-type]
    for bad in (math.nan, np.float64(math.inf), torch.tensor(-math.inf), -1.0):
        with pytest.raises(ValueError, match="`scale` to be a finite number > 0"):
            SimplexETFHead(8, 4, scale=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`in_features` to be an int"):
        SimplexETFHead(8.0, 4)  # type: ignore[arg-type]


def test_etf_init_fills_a_weight_property_that_returns_a_submodule_parameter() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        @property
        def weight(self) -> torch.Tensor:
            return self.fc.weight

    wrapper = etf_init_(Wrapper())
    gram = wrapper.fc.weight.detach().double() @ wrapper.fc.weight.detach().double().T
    torch.testing.assert_close(gram, (torch.eye(4, dtype=F64) - 0.25) * 4 / 3, rtol=0, atol=1e-6)


def test_reset_parameters_rebuilds_drawn_frames_after_meta_initialisation() -> None:
    # Deferred initialisation: build on the meta device, to_empty(), reset_parameters(): the same
    # head as one built directly (frame, scale, bias), also with a caller's generator.
    from torchcollapse.heads import NearestETFHead

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    makers = {
        "etf": lambda: SimplexETFHead(16, 5, learnable_scale=True, bias=True),
        "etf, generator": lambda: SimplexETFHead(
            16, 5, generator=torch.Generator().manual_seed(seed)
        ),
        "orthogonal": lambda: OrthogonalFrameHead(16, 5, dtype=F64),
        "spherical": lambda: SphericalCodeHead(3, 8, steps=30),
        "nearest": lambda: NearestETFHead(16, 5),
    }
    for name, make in makers.items():
        reference = make()
        with torch.device("meta"):
            head = make()
        head = head.to_empty(device="cpu")
        head.reset_parameters()
        assert torch.equal(head.frame, reference.frame), f"{name}, seed {seed}"
        assert float(head._current_scale()) == float(reference._current_scale()), name
        if head.bias is not None:
            assert torch.equal(head.bias, torch.zeros_like(head.bias)), name
    trained = NearestETFHead(16, 5)
    trained(features(20, 16, seed=seed), torch.arange(5).repeat(4))
    trained.reset_parameters()
    assert not trained.class_seen.any()
    assert torch.equal(trained.frame, NearestETFHead(16, 5).frame)
    given = FixedFrameHead(simplex_etf(5, 16) * 2.0, bias=True)  # a given frame is data
    with torch.no_grad():
        given.bias.fill_(1.0)  # type: ignore[union-attr]
    given.reset_parameters()
    assert torch.equal(given.frame, simplex_etf(5, 16) * 2.0)
    assert given.bias is not None
    assert not given.bias.any()


def test_heads_built_under_a_default_device_context_draw_their_frames_on_the_cpu() -> None:
    # Under `with torch.device(...)` a head lands on that device, but its frame is the CPU draw:
    # two heads from one generator differ as without the context, and come back as the eager
    # heads after to_empty() + reset_parameters(); a default device a CPU generator cannot draw
    # on (CUDA, simulated) builds the same head.
    from torchcollapse.heads import NearestETFHead

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    makers = {
        "etf": lambda g: SimplexETFHead(16, 5, generator=g, learnable_scale=True, bias=True),
        "orthogonal": lambda g: OrthogonalFrameHead(16, 5, generator=g),
        "spherical": lambda g: SphericalCodeHead(3, 7, steps=20, generator=g),
        "nearest": lambda g: NearestETFHead(16, 5, generator=g),
    }
    for name, make in makers.items():
        gen = torch.Generator().manual_seed(seed)
        eager = [make(gen), make(gen)]
        assert not torch.equal(eager[0].frame, eager[1].frame), f"{name}, seed {seed}"
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            meta = [make(gen), make(gen)]
        for built, reference in zip(meta, eager):
            assert all(t.is_meta for t in (*built.parameters(), *built.buffers())), name
            built.to_empty(device="cpu").reset_parameters()
            assert torch.equal(built.frame, reference.frame), f"{name}, seed {seed}"
        gen = torch.Generator().manual_seed(seed)
        with foreign_default_device():
            foreign = [make(gen), make(gen)]
        for built, reference in zip(foreign, eager):
            assert torch.equal(built.frame, reference.frame), f"{name}, seed {seed}"
    with foreign_default_device():
        assert torch.equal(SimplexETFHead(512, 10).frame, simplex_etf(10, 512))
    linear = nn.Linear(16, 5)
    with torch.device("meta"):  # a CPU weight initialised inside a meta context
        etf_init_(linear)
    torch.testing.assert_close(linear.weight.detach(), simplex_etf(5, 16), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["etf", "etf_learnable_bias", "cosine"])
def test_exported_normalized_heads_run_with_autograd_and_match_eager(kind: str) -> None:
    # torch.export records the forward's operations: the exported program runs with grad
    # enabled and autograd through those operations gives the fused backward's gradients.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    torch.manual_seed(seed)
    heads = {
        "etf": lambda: SimplexETFHead(8, 4, dtype=F64),
        "etf_learnable_bias": lambda: SimplexETFHead(
            8, 4, learnable_scale=True, bias=True, dtype=F64
        ),
        "cosine": lambda: CosineHead(8, 4, learnable_scale=True, dtype=F64),
    }
    model = nn.Sequential(nn.Linear(8, 8, dtype=F64), heads[kind]()).eval()
    bias = getattr(model[1], "bias", None)
    if bias is not None:
        with torch.no_grad():
            bias.normal_()
    x = features(5, 8, seed=seed, dtype=F64)
    exported = torch.export.export(model, (x,)).module()
    x_eager, x_exported = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = features(5, 4, seed=seed + 1, dtype=F64)
    eager_out, exported_out = model(x_eager), exported(x_exported)
    # float64: the same operations up to the order of a few sums (a few ulps)
    torch.testing.assert_close(exported_out, eager_out, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    (eager_out * upstream).sum().backward()
    (exported_out * upstream).sum().backward()
    assert x_eager.grad is not None
    assert x_exported.grad is not None
    torch.testing.assert_close(x_exported.grad, x_eager.grad, rtol=1e-10, atol=1e-12)
    exported_parameters = dict(exported.named_parameters())
    for name, parameter in model.named_parameters():
        got = exported_parameters[name].grad
        assert got is not None, name
        torch.testing.assert_close(
            got, parameter.grad, rtol=1e-10, atol=1e-12, msg=f"{name}, seed {seed}"
        )


def test_etf_init_reads_the_gain_as_a_finite_number() -> None:
    """``gain`` is a finite real number (numpy and 0-dim tensors too): rows of norm ``|gain|``,
    a negative gain flipping the frame (as ``torch.nn.init``); NaN, infinities, bools and
    strings are refused by name before anything is written (NaN filled the weight). Reference:
    the Gram matrix ``gain^2 K/(K-1) (I - 11^T/K)`` in float64."""
    import numpy as np

    k, d = 5, 8
    gain = float(torch.rand(()) * 4 + 0.1)
    etf = torch.eye(k, dtype=torch.float64) - 1.0 / k
    values = (
        (gain, 1.0),
        (np.float64(gain), 1.0),
        (torch.tensor(-gain, dtype=torch.float64), -1.0),
    )
    for value, sign in values:
        weight = etf_init_(torch.empty(k, d, dtype=torch.float64), gain=value)  # type: ignore[arg-type]
        torch.testing.assert_close(weight @ weight.T, gain**2 * k / (k - 1) * etf)
        flipped = etf_init_(torch.empty(k, d, dtype=torch.float64), gain=abs(float(value)))
        torch.testing.assert_close(weight, sign * flipped)
    linear = nn.Linear(d, k)
    before = linear.weight.detach().clone()
    for bad in (float("nan"), float("inf"), True, "2"):
        error = TypeError if isinstance(bad, (bool, str)) else ValueError
        with pytest.raises(error, match=r"`gain` to be a (finite|real) number"):
            etf_init_(linear, gain=bad)  # type: ignore[arg-type]
        assert torch.equal(linear.weight, before)


# ------------------------------------------------------------------------------------------------
# torch.fx symbolic tracing (create_feature_extractor, FX graph-mode quantization)
# ------------------------------------------------------------------------------------------------


def _fx_case(kind: str) -> tuple[Callable[[], nn.Module], int, int]:
    """A head factory for the symbolic-trace tests, with its ``in_features`` and classes."""
    from torchcollapse.heads import NearestETFHead

    cases: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
        "cosine": (lambda: CosineHead(12, 5, learnable_scale=True), 12, 5),
        "cosface": (lambda: CosineHead(12, 5, scale=8.0, margin=0.3), 12, 5),
        "arcface": (lambda: CosineHead(12, 5, margin=0.4, margin_type="arcface"), 12, 5),
        "arcface_easy": (
            lambda: CosineHead(12, 5, margin=0.4, margin_type="arcface", easy_margin=True),
            12,
            5,
        ),
        "nearest": (lambda: NearestETFHead(12, 5, momentum=0.5, bias=True), 12, 5),
    }
    for name, factory in HEAD_FACTORIES.items():
        head = factory()
        cases[name] = (factory, head.in_features, head.num_classes)
    return cases[kind]


FX_KINDS = [*HEAD_FACTORIES, "cosine", "cosface", "arcface", "arcface_easy", "nearest"]


@pytest.mark.parametrize("kind", FX_KINDS)
def test_heads_trace_symbolically_and_match_the_module(kind: str) -> None:
    # torch.fx.symbolic_trace called forward with proxies, which the input checks refused
    # ("Expected argument `features` to be a Tensor, but got Proxy"). The graph must compute
    # what the head computes, bit for bit (it calls the same functions on the same tensors):
    # outputs, gradients and the frame of NearestETFHead over labelled and unlabelled calls.
    # It must also refuse what the head refuses, with the same error, before the frame moves
    # (the checks ran only while tracing, on proxies: the graph took features of another width,
    # or float labels, which it truncated).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    factory, d, k = _fx_case(kind)
    x = features(9, d, seed=seed)
    y = torch.randint(0, k, (9,), generator=torch.Generator().manual_seed(seed + 1))
    takes_target = kind in ("cosine", "cosface", "arcface", "arcface_easy", "nearest")
    # traced at the root, the graph takes `target` as an input that may be left out
    calls = [(x,), (x, y), (x * 2.0, y), (x,)] if takes_target else [(x,), (x * 2.0,)]
    refused: list[tuple[torch.Tensor, ...]] = [(features(9, d + 1, seed=seed),), (x.long(),)]
    out_of_range = y.clone()
    out_of_range[int(torch.randint(0, 9, ()))] = k
    nan = x.clone()
    nan[int(torch.randint(0, 9, ())), int(torch.randint(0, d, ()))] = float("nan")
    # labels the head reads (CosineHead always, NearestETFHead in training): floats, a label out
    # of range, one label too few; NearestETFHead's update also refuses NaN features
    bad_labels = [(x, y.float() + 0.5), (x, out_of_range), (x, y[:-1])]
    try:
        if kind == "nearest":
            check_symbolic_trace(factory, calls, refused=refused)
            check_symbolic_trace(factory, calls, modes=(True,), refused=[*bad_labels, (nan, y)])
        else:
            check_symbolic_trace(
                factory, calls, refused=refused + (bad_labels if takes_target else [])
            )
    except AssertionError as error:
        raise AssertionError(f"{kind}, seed {seed}: {error}") from error


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_traced_heads_keep_the_precision_handling_of_other_dtypes(dtype: torch.dtype) -> None:
    # the normalized product branches on the dtype (float32 factors for 16-bit features) when the
    # graph runs: the traced graph equals the head in every dtype
    from torchcollapse.heads import NearestETFHead

    seed = int(torch.randint(0, 2**31, ()))
    x = features(6, 16, seed=seed).to(dtype)
    y = torch.arange(6) % 5
    heads: list[tuple[Callable[[], nn.Module], list[tuple[torch.Tensor, ...]]]] = [
        (lambda: SimplexETFHead(16, 5, learnable_scale=True, bias=True).to(dtype), [(x,)]),
        (lambda: CosineHead(16, 5, margin=0.2, margin_type="arcface").to(dtype), [(x, y)]),
        (lambda: NearestETFHead(16, 5).to(dtype), [(x, y), (x,)]),
    ]
    for factory, calls in heads:
        try:
            check_symbolic_trace(factory, calls)
        except AssertionError as error:
            raise AssertionError(f"{dtype}, seed {seed}: {error}") from error


class _LabelledNet(nn.Module):
    """A backbone and a head that takes the labels in training, as a training model would."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        from torchcollapse.norms import FeatureCenter

        self.body = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), FeatureCenter(12))
        self.head = head

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x), target)
        return out


def test_a_model_with_a_head_traces_whole_and_matches_the_model() -> None:
    from torchcollapse.heads import NearestETFHead
    from torchcollapse.norms import FeatureCenter, FeatureNorm

    seed = int(torch.randint(0, 2**31, ()))
    x = features(8, 10, seed=seed)
    y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(seed))
    models: dict[str, Callable[[], nn.Module]] = {
        "sequential": lambda: nn.Sequential(
            nn.Linear(10, 12),
            nn.ReLU(),
            FeatureCenter(12, momentum=None),
            FeatureNorm(3.0, learnable=True),
            SimplexETFHead(12, 5, learnable_scale=True, bias=True),
        ),
        "nearest": lambda: _LabelledNet(NearestETFHead(12, 5, momentum=0.3)),
        "cosface": lambda: _LabelledNet(CosineHead(12, 5, scale=10.0, margin=0.25)),
    }
    for name, factory in models.items():
        calls = [(x,), (x * 0.5,)] if name == "sequential" else [(x, y), (x,), (x * 0.5, y)]
        try:
            # (a graph of _LabelledNet, whose forward has string annotations, cannot be pickled)
            check_symbolic_trace(factory, calls, pickled=name == "sequential")
        except AssertionError as error:
            raise AssertionError(f"{name}, seed {seed}: {error}") from error
    # the labels' update is one node of the graph, which dead-code elimination keeps
    traced = torch.fx.symbolic_trace(models["nearest"]().train())
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert sum(getattr(t, "__name__", "") == "_frame_step" for t in targets) == 1


def test_tracing_a_training_update_refuses_a_process_group() -> None:
    # a graph cannot hold a process group: tracing the update with one is refused by name; in
    # evaluation mode (no update), or without sync_dist, the group does not enter the graph
    from torchcollapse.heads import NearestETFHead

    group = object()  # stands for a torch.distributed process group (never used here)
    head = NearestETFHead(8, 3, process_group=group)
    with pytest.raises(RuntimeError, match=r"`process_group` of NearestETFHead to be None"):
        torch.fx.symbolic_trace(head.train())
    x = features(4, 8)
    torch.testing.assert_close(torch.fx.symbolic_trace(head.eval())(x), head(x), rtol=0, atol=0)
    unsynced = NearestETFHead(8, 3, process_group=group, sync_dist=False).train()
    traced = torch.fx.symbolic_trace(unsynced)
    reference = NearestETFHead(8, 3, sync_dist=False).train()
    y = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(traced(x, y), reference(x, y), rtol=0, atol=0)
    torch.testing.assert_close(unsynced.frame, reference.frame, rtol=0, atol=0)


def test_create_feature_extractor_after_replace_head() -> None:
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    from torchcollapse.heads import replace_head
    from torchcollapse.norms import FeatureNorm

    seed = int(torch.randint(0, 2**31, ()))
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), FeatureNorm(2.0), nn.Linear(12, 5))
    replace_head(model, SimplexETFHead)
    assert isinstance(model[3], SimplexETFHead)
    x = features(7, 10, seed=seed)
    for training in (False, True):
        model.train(training)
        extractor = feature_extraction.create_feature_extractor(
            model, {"1": "penultimate", "3": "logits"}
        ).train(training)
        got = extractor(x)
        torch.testing.assert_close(got["penultimate"], model[1](model[0](x)), rtol=0, atol=0)
        torch.testing.assert_close(got["logits"], model(x), rtol=0, atol=0)
