"""CosineHead: NormFace logits and CosFace/ArcFace margins against a per-sample float64 loop."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from tests._helpers.testers import check_module
from torchcollapse.heads import CosineHead, scale_for_loss_floor

F64 = torch.float64


def brute_force_logits(
    head: CosineHead, h: torch.Tensor, target: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Per sample and class in float64, from the angle (math.acos / math.cos), as documented."""
    w = head.weight.detach().double()
    h = h.double()
    m = head.margin
    out = torch.empty(h.shape[0], w.shape[0], dtype=F64)
    for i in range(h.shape[0]):
        for c in range(w.shape[0]):
            cosine = float(h[i] @ w[c]) / (float(h[i].norm()) * float(w[c].norm()))
            value = cosine
            if target is not None and c == int(target[i]):
                theta = math.acos(max(-1.0, min(1.0, cosine)))
                if head.margin_type == "cosface":
                    value = cosine - m
                elif head.easy_margin:
                    value = math.cos(theta + m) if cosine > 0 else cosine
                elif theta + m <= math.pi:
                    value = math.cos(theta + m)
                else:
                    value = cosine - m * math.sin(m)
            out[i, c] = scale * value
    return out


def batch(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=F64), torch.randint(0, k, (n,), generator=gen)


@pytest.mark.parametrize(
    ("margin_type", "margin", "easy"),
    [
        ("cosface", 0.35, False),
        ("arcface", 0.5, False),
        ("arcface", 0.5, True),
        ("arcface", 1.2, False),
    ],
)
def test_margins_match_a_brute_force_formula(margin_type: str, margin: float, easy: bool) -> None:
    k, d = 6, 5
    head = CosineHead(
        d,
        k,
        scale=30.0,
        margin=margin,
        margin_type=margin_type,
        easy_margin=easy,
        dtype=F64,  # type: ignore[arg-type]
    )
    h, target = batch(40, d, k)
    # half the samples point away from their class vector: cos(theta_y) < 0, and for the large
    # ArcFace margin theta_y + m > pi, so every branch of the formula is exercised
    w = head.weight.detach()
    h[:20] = -w[target[:20]] + 0.3 * h[:20]
    cos_y = F.cosine_similarity(h, w[target], dim=1)
    assert bool((cos_y < 0).any())
    assert bool((cos_y > 0).any())
    if margin_type == "arcface" and not easy:
        assert bool((torch.arccos(cos_y) + margin > math.pi).any())
    # float64 throughout: the two formulas agree to a few ulps of s = 30
    torch.testing.assert_close(
        head(h, target), brute_force_logits(head, h, target, 30.0), rtol=1e-12, atol=1e-11
    )
    # without the target: plain s cos(theta), as at evaluation
    torch.testing.assert_close(
        head(h), brute_force_logits(head, h, None, 30.0), rtol=1e-12, atol=1e-11
    )


def test_no_margin_and_default_scale() -> None:
    head = CosineHead(5, 4, dtype=F64)
    assert head.scale == pytest.approx(scale_for_loss_floor(0.01, 4))
    h, target = batch(8, 5, 4)
    torch.testing.assert_close(head(h, target), head(h))
    torch.testing.assert_close(head(h), brute_force_logits(head, h, None, float(head.scale)))
    torch.testing.assert_close(
        head.effective_weight, float(head.scale) * F.normalize(head.weight.detach(), dim=1)
    )


@pytest.mark.parametrize(
    "factory",
    [
        lambda: CosineHead(6, 4, scale=10.0),
        lambda: CosineHead(6, 4, learnable_scale=True, margin=0.2, margin_type="cosface"),
        lambda: CosineHead(6, 9, scale=16.0, margin=0.4, margin_type="arcface"),
    ],
    ids=["normface", "cosface_learnable", "arcface"],
)
def test_cosine_head_passes_the_module_tester(factory) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(7, 6, generator=gen)
    target = torch.randint(0, factory().num_classes, (7,), generator=gen)
    # built with another scale, a head computes the saved one's logits once it has loaded them
    other = factory()
    other._scale *= 3.0

    check_module(factory, (h, target), load_into=[lambda: other])
    check_module(factory, (h,), gradcheck=False, compile_backend=None)


@pytest.mark.parametrize(
    ("margin_type", "margin"), [("cosface", 0.0), ("cosface", 0.35), ("arcface", 0.5)]
)
def test_a_fixed_scale_round_trips_through_state_dict(margin_type: str, margin: float) -> None:
    import io

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    gen = torch.Generator().manual_seed(seed)
    k, d = 6, 5
    saved_scale = float(torch.empty((), dtype=F64).uniform_(1.0, 64.0, generator=gen))
    options = {"margin": margin, "margin_type": margin_type, "dtype": F64}
    saved = CosineHead(d, k, scale=saved_scale, **options)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    loaded = CosineHead(d, k, scale=saved_scale / 3.0, **options)  # type: ignore[arg-type]
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.scale == saved_scale, f"seed {seed}"
    h, target = batch(8, d, k, seed)
    for given in (None, target):  # evaluation, and training with the margin
        got = loaded(h, given)
        torch.testing.assert_close(got, saved(h, given), rtol=0, atol=0, msg=f"seed {seed}")
        expected = brute_force_logits(saved, h, given, saved_scale)
        # float64; acos/cos of the brute force lose a few ulps near |cos| = 1
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=f"seed {seed}")


def test_learnable_scale_and_weight_get_gradients() -> None:
    head = CosineHead(5, 4, learnable_scale=True, margin=0.3, margin_type="arcface")
    h, target = batch(8, 5, 4)
    F.cross_entropy(head(h.float(), target), target).backward()
    assert head.weight.grad is not None
    assert head.log_scale is not None
    assert head.log_scale.grad is not None
    assert torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_arcface_gradient_is_finite_at_cos_one(easy_margin: bool, dtype: torch.dtype) -> None:
    """At cos(theta_y) = +1 and -1 exactly, where d sin(theta)/d cos(theta) is infinite, the
    gradients are finite (the sine is clamped at sqrt(eps)) and equal the closed form. Exact
    inputs: class vectors e_0, e_1, e_2 and features 2 e_0 (label 0: cos +1) and -e_1 (label 1:
    cos -1). Closed form: the target cosine's gradient (w_y - cos h^) / ||h|| vanishes at
    cos = +-1, so only the other classes (cos 0) contribute, d/dh_i = s / ||h_i|| sum g_ic e_c
    and d/dw_c = s sum_i g_ic h^_i over the samples whose label is not c; the logits are s cos
    elsewhere and s cos(m), s (-1 - m sin m) (easy margin: s cos(m), -s) at the targets, up to
    the clamp's s sqrt(eps) sin(m) at cos = +1."""
    scale, m = 10.0, 0.5
    head = CosineHead(
        4, 3, scale=scale, margin=m, margin_type="arcface", easy_margin=easy_margin, dtype=dtype
    )
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4))
    h = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]], dtype=dtype)
    h.requires_grad_()
    target = torch.tensor([0, 1])
    seed = int(torch.randint(0, 2**31, ()))  # fresh upstream gradient, reported on failure
    g = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    logits = head(h, target)
    (logits * g.to(dtype)).sum().backward()
    assert h.grad is not None
    assert head.weight.grad is not None
    assert torch.isfinite(h.grad).all(), f"seed {seed}"
    assert torch.isfinite(head.weight.grad).all(), f"seed {seed}"
    eps = torch.finfo(dtype).eps
    at_minus_one = -1.0 if easy_margin else -1.0 - m * math.sin(m)
    expected = scale * torch.tensor([[math.cos(m), 0.0, 0.0], [0.0, at_minus_one, 0.0]], dtype=F64)
    # the clamp shifts the cos = +1 logit by s sqrt(eps) sin(m); the rest: a few roundings of s
    torch.testing.assert_close(
        logits.double(),
        expected,
        rtol=0,
        atol=scale * math.sqrt(eps) * math.sin(m) + 8 * scale * eps,
    )
    unit_h = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]], dtype=F64)
    norms = torch.tensor([[2.0], [1.0]], dtype=F64)
    others = torch.ones(2, 3, dtype=F64)
    others[0, 0] = others[1, 1] = 0.0  # the targets contribute nothing
    grad_h = scale * (g * others) @ torch.eye(3, 4, dtype=F64) / norms
    grad_w = scale * (g * others).T @ unit_h
    # a few roundings of products of s and g in the dtype
    tol = 8 * eps * scale * float(g.abs().max())
    torch.testing.assert_close(h.grad.double(), grad_h, rtol=0, atol=tol, msg=f"seed {seed}")
    torch.testing.assert_close(
        head.weight.grad.double(), grad_w, rtol=0, atol=tol, msg=f"seed {seed}"
    )


def test_repr() -> None:
    text = repr(CosineHead(5, 4, scale=30.0, margin=0.5, margin_type="arcface", easy_margin=True))
    assert text == (
        "CosineHead(in_features=5, num_classes=4, scale=30.0, learnable_scale=False, "
        "margin=0.5, margin_type='arcface', easy_margin=True)"
    )


def test_cosine_head_errors() -> None:
    with pytest.raises(ValueError, match="`margin_type` to be 'cosface' or 'arcface'"):
        CosineHead(5, 4, margin_type="sphereface")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`margin` to be a number in \[0, inf\)"):
        CosineHead(5, 4, margin=-0.1)
    with pytest.raises(ValueError, match=r"`margin` to be a number in \[0, pi\)"):
        CosineHead(5, 4, margin=4.0, margin_type="arcface")
    head = CosineHead(5, 4, margin=0.2)
    with pytest.raises(ValueError, match=r"`target` of shape \(N,\)"):
        head(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="`target` to hold integers"):
        head(torch.randn(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match=r"`target` to hold labels in \[0, 3\], but got labels in"):
        head(torch.randn(3, 5), torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="last dimension 5"):
        head(torch.randn(3, 6))


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.complex128, "float32"]
)
def test_cosine_head_refuses_a_non_floating_dtype(dtype: object) -> None:
    # an integer dtype failed inside nn.Parameter without naming `dtype`, a complex one only at
    # the first forward: both raise at construction, naming it, as the fixed-frame heads do
    message = f"Expected argument `dtype` to be a floating dtype, but got {dtype!r}."
    for learnable_scale in (False, True):
        with pytest.raises(TypeError, match=re.escape(message)):
            CosineHead(8, 3, learnable_scale=learnable_scale, dtype=dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F64])
def test_cosine_head_takes_any_floating_dtype(dtype: torch.dtype) -> None:
    head = CosineHead(8, 3, scale=5.0, learnable_scale=True, dtype=dtype)
    assert head.weight.dtype == dtype
    assert head.log_scale is not None
    assert head.log_scale.dtype == dtype


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
def test_per_sample_gradients_with_a_margin_match_a_loop(margin_type: str) -> None:
    # torch.func per-sample gradients (vmap over grad) with the targets batched too: the label
    # range cannot be read under vmap, and is not; against one plain backward per sample.
    from torch.func import functional_call, grad, vmap

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    torch.manual_seed(seed)
    head = CosineHead(8, 4, margin=0.3, margin_type=margin_type, learnable_scale=True, dtype=F64)
    h, target = batch(6, 8, 4, seed=seed + 1)  # not the weight's draw (cosines of 1)
    params = {name: p.detach() for name, p in head.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(head, p, (x[None], y[None])), y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, h, target)
    for i in range(h.shape[0]):
        head.zero_grad()
        F.cross_entropy(head(h[i : i + 1], target[i : i + 1]), target[i : i + 1]).backward()
        for name, p in head.named_parameters():
            assert p.grad is not None
            # float64, the same operations batched or not: a few ulps
            torch.testing.assert_close(
                per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12, msg=f"seed {seed}, {name}"
            )


def test_margin_may_be_any_real_scalar() -> None:
    """``margin`` is read like every other number argument: numpy and 0-dim tensor scalars give
    the head of the Python float (same logits), bools and strings are refused by name."""
    import numpy as np

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x, y = torch.randn(5, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
    torch.manual_seed(0)
    expected = CosineHead(8, 4, margin=0.25)(x, y)
    for margin in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        torch.manual_seed(0)
        head = CosineHead(8, 4, margin=margin)
        assert type(head.margin) is float
        torch.testing.assert_close(head(x, y), expected, rtol=0, atol=0)
    for bad in (True, "0.2", -0.1, float("nan")):
        with pytest.raises(
            TypeError if isinstance(bad, (bool, str)) else ValueError, match="`margin`"
        ):
            CosineHead(8, 4, margin=bad)
