"""NearestETFHead and nearest_simplex_etf: Procrustes optimality, running means, DDP, compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests._helpers.ddp import run_distributed
from tests._helpers.testers import check_module
from torchcollapse.frames import nearest_simplex_etf, simplex_etf
from torchcollapse.heads import NearestETFHead

F64 = torch.float64
# float64 Procrustes: an SVD and a few products, errors of a few hundred ulps
TOL = 1e-10


def reference_nearest_etf(points: torch.Tensor) -> torch.Tensor:
    """Independent construction: basis of 1-perp from a QR of the centring matrix, then the
    polar factor by an eigendecomposition of A^T A (not an SVD)."""
    k = points.shape[0]
    target = points.double() / points.double().norm(dim=1, keepdim=True)
    centring = torch.eye(k, dtype=F64) - 1.0 / k
    basis, _ = torch.linalg.qr(centring[:, : k - 1])  # K x (K-1), orthonormal, orthogonal to 1
    a = target.T @ basis  # d x (K-1)
    values, vectors = torch.linalg.eigh(a.T @ a)
    polar = a @ vectors @ torch.diag(values.rsqrt()) @ vectors.T  # a (a^T a)^(-1/2)
    return math.sqrt(k / (k - 1)) * basis @ polar.T


def simplex_gram(k: int) -> torch.Tensor:
    return (k / (k - 1)) * (torch.eye(k, dtype=F64) - 1.0 / k)


@pytest.mark.parametrize(("k", "d"), [(2, 1), (3, 2), (5, 4), (5, 12), (40, 64)])
def test_nearest_simplex_etf_matches_an_independent_procrustes(k: int, d: int) -> None:
    gen = torch.Generator().manual_seed(k + d)
    points = torch.randn(k, d, generator=gen, dtype=F64) * torch.rand(
        k, 1, generator=gen, dtype=F64
    )
    if d == 1:  # on a line, only points on both sides of 0 determine the ETF
        points[0], points[1] = points[0].abs(), -points[1].abs()
    nearest = nearest_simplex_etf(points)
    torch.testing.assert_close(nearest @ nearest.T, simplex_gram(k), rtol=0, atol=TOL)
    torch.testing.assert_close(nearest, reference_nearest_etf(points), rtol=0, atol=1e-8)


def test_nearest_simplex_etf_is_a_local_minimum_and_recovers_an_etf() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(6, 9, generator=gen, dtype=F64)
    target = points / points.norm(dim=1, keepdim=True)
    nearest = nearest_simplex_etf(points)
    best = float((nearest - target).norm())
    for _ in range(50):  # small random rotations of the answer are never closer
        skew = 1e-3 * torch.randn(9, 9, generator=gen, dtype=F64)
        rotation = torch.linalg.matrix_exp(skew - skew.T)
        assert float((nearest @ rotation - target).norm()) >= best - 1e-12
    # an ETF, rescaled row by row, is its own nearest ETF
    etf = simplex_etf(6, 9, dtype=F64, generator=gen)
    scaled = etf * torch.rand(6, 1, generator=gen, dtype=F64)
    torch.testing.assert_close(nearest_simplex_etf(scaled), etf, rtol=0, atol=TOL)
    # float32 in, float32 out
    assert nearest_simplex_etf(points.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="d >= K - 1"):
        nearest_simplex_etf(torch.randn(5, 3))
    with pytest.raises(ValueError, match="`previous`"):
        nearest_simplex_etf(torch.randn(5, 4), proximal=0.1)


def test_training_step_moves_the_frame_to_the_nearest_etf_of_the_running_means() -> None:
    k, d = 4, 6
    head = NearestETFHead(d, k, momentum=0.5, proximal=0.0, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    x1, y1 = torch.randn(12, d, generator=gen, dtype=F64), torch.tensor([0, 1, 2] * 4)
    x2, y2 = torch.randn(8, d, generator=gen, dtype=F64), torch.tensor([1, 2] * 4)
    initial = head.frame.clone()
    head.eval()
    head(x1, y1)
    assert torch.equal(head.frame, initial)  # evaluation: fixed
    head.train()
    head(x1)
    assert torch.equal(head.frame, initial)  # no target: fixed
    head(x1, y1)
    head(x2, y2)
    unit1, unit2 = F.normalize(x1, dim=1), F.normalize(x2, dim=1)
    expected = torch.zeros(k, d, dtype=F64)
    for c in range(k):
        first = unit1[y1 == c].mean(0) if (y1 == c).any() else torch.zeros(d, dtype=F64)
        if (y2 == c).any():  # momentum 0.5 towards the second batch's mean
            expected[c] = first + 0.5 * (unit2[y2 == c].mean(0) - first)
        else:
            expected[c] = first
    torch.testing.assert_close(head.running_means, expected, rtol=0, atol=1e-12)
    assert head.class_seen.tolist() == [True, True, True, False]
    # class 3 was never seen: its row carries no information, so compare on a full problem
    head = NearestETFHead(d, k, momentum=1.0, proximal=0.0, dtype=F64)
    x, y = torch.randn(16, d, generator=gen, dtype=F64), torch.arange(16) % k
    logits = head(x, y)
    means = torch.stack([F.normalize(x, dim=1)[y == c].mean(0) for c in range(k)])
    torch.testing.assert_close(head.frame, reference_nearest_etf(means), rtol=0, atol=1e-8)
    # the logits of the step use the new frame
    torch.testing.assert_close(logits, head.scale * F.normalize(x, dim=1) @ head.frame.T)


def test_frame_follows_rotated_class_means() -> None:
    # features around a rotated ETF: after one step the frame is that ETF (up to the noise)
    k, d = 5, 8
    truth = simplex_etf(k, d, generator=torch.Generator().manual_seed(9), dtype=F64)
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(200) % k
    x = 3.0 * truth[y] + 0.05 * torch.randn(200, d, generator=gen, dtype=F64)
    head = NearestETFHead(d, k, momentum=1.0, dtype=F64).train()
    assert float((head.frame - truth).abs().max()) > 0.3  # starts elsewhere
    head(x, y)
    assert float((head.frame - truth).abs().max()) < 0.02


def test_two_forwards_before_one_backward() -> None:
    head = NearestETFHead(6, 3)
    x1, x2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = F.cross_entropy(head(x1, y), y) + F.cross_entropy(head(x2, y), y)
    loss.backward()  # the frame buffer was updated in between: no in-place autograd error
    assert x1.grad is not None
    assert x2.grad is not None


def test_nearest_head_passes_the_module_tester() -> None:
    check_module(
        lambda: NearestETFHead(8, 4, bias=True),
        (torch.randn(6, 8),),
        load_into=[lambda: NearestETFHead(8, 4, bias=True, scale=2.0)],
    )


def test_training_step_compiles() -> None:
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(12) % 4
    eager = NearestETFHead(8, 4).train()
    compiled_module = NearestETFHead(8, 4).train()
    compiled = torch.compile(compiled_module, backend="aot_eager")
    for _ in range(2):
        expected, got = eager(x, y), compiled(x, y)
        # float32: one SVD and a few products differ by a few ulps between the two graphs
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_module.frame, eager.frame, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_module.running_means, eager.running_means)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_batch_is_refused_and_leaves_the_head_as_it_was(bad: float) -> None:
    # The error names `features` and comes before any state changes; the next batches update
    # the head exactly as if the refused one had never come (against a head that never saw it).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    gen = torch.Generator().manual_seed(seed)
    k, d = 4, 6
    batches = [(torch.randn(12, d, generator=gen, dtype=F64), torch.arange(12) % k) for _ in "ab"]
    head = NearestETFHead(d, k, momentum=0.5, dtype=F64)
    clean = NearestETFHead(d, k, momentum=0.5, dtype=F64)
    head(*batches[0])
    clean(*batches[0])
    before = {name: t.clone() for name, t in head.state_dict().items()}
    poisoned = torch.randn(12, d, generator=gen, dtype=F64)
    poisoned[int(torch.randint(0, 12, (), generator=gen)), int(torch.randint(0, d, ()))] = bad
    with pytest.raises(ValueError, match="`features` to be finite"):
        head(poisoned, torch.arange(12) % k)
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name}, seed {seed}"
    torch.testing.assert_close(head(*batches[1]), clean(*batches[1]), rtol=0, atol=0)
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, clean.state_dict()[name]), f"{name}, seed {seed}"
    # compiled (no error without a graph break): the batch is skipped
    compiled_head = NearestETFHead(d, k, momentum=0.5, dtype=F64)
    compiled = torch.compile(compiled_head, backend="aot_eager", fullgraph=True)
    compiled(*batches[0])
    compiled(poisoned, torch.arange(12) % k)
    assert torch.isfinite(compiled_head.running_means).all(), f"seed {seed}"
    compiled(*batches[1])
    torch.testing.assert_close(compiled_head.frame, clean.frame, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compiled_head.running_means, clean.running_means)


def test_nearest_simplex_etf_refuses_non_finite_points() -> None:
    points = torch.randn(4, 5, dtype=F64)
    points[1, 2] = math.nan
    with pytest.raises(ValueError, match="`points` to be finite"):
        nearest_simplex_etf(points)
    previous = simplex_etf(4, 5, dtype=F64)
    previous[0, 0] = math.inf
    with pytest.raises(ValueError, match="`previous` to be finite"):
        nearest_simplex_etf(torch.randn(4, 5, dtype=F64), previous=previous, proximal=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": 0.0}, ValueError, r"`eps` to be a finite number > 0, but got 0\.0"),
        ({"eps": -1e-12}, ValueError, "`eps` to be a finite number > 0"),
        ({"eps": math.nan}, ValueError, "`eps` to be a finite number > 0"),
        ({"eps": "1e-12"}, TypeError, "`eps` to be a real number, but got str"),
        ({"eps": True}, TypeError, "`eps` to be a real number, but got bool"),
        ({"proximal": -5.0}, ValueError, r"`proximal` to be a finite number >= 0, but got -5\.0"),
        ({"proximal": math.nan}, ValueError, "`proximal` to be a finite number >= 0, but got nan"),
        ({"proximal": math.inf}, ValueError, "`proximal` to be a finite number >= 0"),
        ({"proximal": True}, TypeError, "`proximal` to be a real number, but got bool"),
        (
            {"proximal": 0.1, "previous": [[0.0]]},
            TypeError,
            "`previous` to be a .* tensor or None, but got list",
        ),
        (
            {"proximal": 0.1, "previous": torch.zeros(3, 5)},
            ValueError,
            r"`previous` .* \(4, 5\) .* shape \(3, 5\)",
        ),
        (
            {"points": torch.ones(4, 5, dtype=torch.int64)},
            TypeError,
            "`points` .* but got dtype torch.int64",
        ),
        ({"points": torch.ones(4, 5, 1)}, ValueError, r"`points` .* but got shape \(4, 5, 1\)"),
        ({"points": [[1.0, 0.0]] * 4}, TypeError, "`points` .* but got list"),
    ],
)
def test_nearest_simplex_etf_argument_errors_name_the_argument(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    # a wrong type (not a tensor, not floating point, not a number) is a TypeError, a wrong
    # shape or value a ValueError, each naming the argument
    points = torch.randn(4, 5, dtype=F64)
    points[2] = 0.0  # a class not seen yet: with eps = 0 it would be 0/0
    arguments: dict[str, object] = {"points": points, **kwargs}
    with pytest.raises(error, match=match):
        nearest_simplex_etf(**arguments)  # type: ignore[arg-type]


def test_nearest_simplex_etf_reads_any_real_scalar_for_proximal_and_eps() -> None:
    import numpy as np

    gen = torch.Generator().manual_seed(3)
    points = torch.randn(4, 5, generator=gen, dtype=F64)
    previous = simplex_etf(4, 5, dtype=F64, generator=gen)
    expected = nearest_simplex_etf(points, previous=previous, proximal=0.25, eps=1e-9)
    for proximal, eps in [(np.float32(0.25), np.float64(1e-9)), (torch.tensor(0.25), 1e-9)]:
        got = nearest_simplex_etf(points, previous=previous, proximal=proximal, eps=eps)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a previous frame that is not used (proximal = 0) is not checked for shape
    torch.testing.assert_close(
        nearest_simplex_etf(points, previous=previous[:2], proximal=0),
        nearest_simplex_etf(points),
        rtol=0,
        atol=0,
    )


def test_nearest_head_learns_a_separable_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    k, d, n = 4, 6, 120
    centres = 4.0 * torch.randn(k, d, generator=gen)
    target = torch.arange(n) % k
    x = centres[target] + torch.randn(n, d, generator=gen)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 8))
    head = NearestETFHead(8, k)
    optimizer = torch.optim.Adam(backbone.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(head(backbone(x), target), target).backward()
        optimizer.step()
    head.eval()
    assert torch.equal(head(backbone(x)).argmax(1), target)


def test_nearest_head_errors() -> None:
    for momentum in (0.0, 1.5, math.nan, np.float64(-0.1)):
        with pytest.raises(ValueError, match=r"`momentum` to be in \(0, 1\]"):
            NearestETFHead(8, 4, momentum=momentum)
    for proximal in (-1.0, math.nan, math.inf, np.float32(-1.0)):
        with pytest.raises(ValueError, match="`proximal` to be a finite float >= 0"):
            NearestETFHead(8, 4, proximal=proximal)
    # not numbers: a wrong type, named
    for bad in (True, "0.5", None, torch.tensor([0.1, 0.2])):
        for name in ("momentum", "proximal"):
            with pytest.raises(TypeError, match=f"`{name}` to be a real number, but got"):
                NearestETFHead(8, 4, **{name: bad})
    # named as the head's argument, as SimplexETFHead does
    with pytest.raises(ValueError, match=r"`in_features` to be at least `num_classes - 1` = 3"):
        NearestETFHead(2, 4)
    with pytest.raises(ValueError, match=r"`target` of shape \(N,\)"):
        NearestETFHead(8, 4)(torch.randn(3, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`target` to hold labels in \[0, 3\], but got labels in"):
        NearestETFHead(8, 4)(torch.randn(3, 8), torch.tensor([0, 4, 1]))
    assert "momentum=0.1, proximal=0.001" in repr(NearestETFHead(8, 4))


@pytest.mark.parametrize(
    "wrap", [float, np.float64, np.float32, torch.tensor], ids=["python", "np64", "np32", "tensor"]
)
def test_nearest_head_reads_any_real_scalar_for_momentum_and_proximal(wrap: object) -> None:
    """``momentum`` and ``proximal`` may be numpy or 0-dim tensor scalars (they were refused),
    read as Python floats: the head takes the same step as with Python floats. Reference: the
    running means of one step from unseen classes, ``(1 - m) 0 + 1 * batch mean`` on the first
    step then ``r + m (b - r)``, in float64 (the values 0.25 and 0.0 are exact in every type)."""
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = (torch.randn(12, 6, generator=gen, dtype=F64) for _ in range(2))
    y = torch.arange(12) % 3
    head = NearestETFHead(6, 3, momentum=wrap(0.25), proximal=wrap(0.0), dtype=F64)  # type: ignore[operator]
    assert type(head.momentum) is float
    assert type(head.proximal) is float
    assert head.momentum == 0.25
    assert head.proximal == 0.0
    head(x1, y)
    head(x2, y)

    def unit_means(features: torch.Tensor) -> torch.Tensor:
        unit = features / features.norm(dim=1, keepdim=True)
        return torch.stack([unit[y == c].mean(0) for c in range(3)])

    expected = unit_means(x1) + 0.25 * (unit_means(x2) - unit_means(x1))
    torch.testing.assert_close(
        head.running_means, expected, rtol=1e-14, atol=1e-15, msg=lambda m: f"seed {seed}: {m}"
    )
    torch.testing.assert_close(head.frame, nearest_simplex_etf(expected), rtol=0, atol=1e-12)


def _ddp_step(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    n = 10 + 3 * rank  # and a different amount of it
    x = torch.randn(n, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 4, (n,), generator=gen)
    head = NearestETFHead(6, 4, momentum=1.0, dtype=F64).train()
    head(x, y)
    return {"x": x, "y": y, "frame": head.frame, "running_means": head.running_means}


@pytest.mark.ddp
def test_update_is_synchronised_across_processes() -> None:
    ranks = run_distributed(_ddp_step, 2)
    assert torch.equal(ranks[0]["frame"], ranks[1]["frame"])
    assert torch.equal(ranks[0]["running_means"], ranks[1]["running_means"])
    # one process on the concatenated batch takes the same step
    single = NearestETFHead(6, 4, momentum=1.0, dtype=F64).train()
    single(torch.cat([r["x"] for r in ranks]), torch.cat([r["y"] for r in ranks]))
    torch.testing.assert_close(ranks[0]["running_means"], single.running_means, rtol=0, atol=1e-12)
    torch.testing.assert_close(ranks[0]["frame"], single.frame, rtol=0, atol=1e-9)


def _ddp_groups_step(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(200 + rank)
    n = 8 + 5 * rank
    x = torch.randn(n, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 4, (n,), generator=gen)
    groups = [dist.new_group([0, 1]), dist.new_group([2])]  # every rank creates every group
    grouped = NearestETFHead(6, 4, momentum=1.0, dtype=F64, process_group=groups[rank // 2])
    grouped.train()(x, y)
    alone = NearestETFHead(6, 4, momentum=1.0, dtype=F64, sync_dist=False).train()
    if rank != 1:  # called on some ranks only: no collective
        alone(x, y)
    dist.barrier()
    return {"x": x, "y": y, "grouped": grouped.running_means, "alone": alone.running_means}


@pytest.mark.ddp
def test_update_is_synchronised_over_its_process_group_only() -> None:
    """With ``process_group`` the batch statistics are summed over that group alone (ranks 0
    and 1 take the step of their concatenated batches, rank 2 that of its own), and with
    ``sync_dist=False`` every process updates from its own batch, also when another process
    does not call the head. Reference: one process on the same batches."""
    ranks = run_distributed(_ddp_groups_step, 3)

    def single(*batches: dict[str, torch.Tensor]) -> torch.Tensor:
        head = NearestETFHead(6, 4, momentum=1.0, dtype=F64).train()
        head(torch.cat([b["x"] for b in batches]), torch.cat([b["y"] for b in batches]))
        return head.running_means

    pair = single(ranks[0], ranks[1])
    for rank, expected in ((0, pair), (1, pair), (2, single(ranks[2]))):
        torch.testing.assert_close(ranks[rank]["grouped"], expected, rtol=0, atol=1e-12)
    for rank in (0, 2):
        torch.testing.assert_close(ranks[rank]["alone"], single(ranks[rank]), rtol=0, atol=0)
    assert not ranks[1]["alone"].any()  # never called there


def test_float64_running_means_are_exact() -> None:
    # The update rate of a float64 head must not be rounded to float32 (it shifted the running
    # means by ~1e-8 relative).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    gen = torch.Generator().manual_seed(seed)
    head = NearestETFHead(6, 4, momentum=0.1, dtype=F64).train()
    x, y = torch.randn(40, 6, generator=gen, dtype=F64), torch.arange(40) % 4
    head(x, y)
    head(2 * x + 1, y)

    def unit_means(features: torch.Tensor) -> torch.Tensor:
        unit = features / features.norm(dim=1, keepdim=True)
        return torch.stack([unit[y == c].mean(0) for c in range(4)])

    first = unit_means(x)
    expected = first + 0.1 * (unit_means(2 * x + 1) - first)
    torch.testing.assert_close(
        head.running_means, expected, rtol=1e-14, atol=1e-15, msg=lambda m: f"seed {seed}: {m}"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_running_means_stay_float32_when_the_head_is_cast(dtype: torch.dtype) -> None:
    """As ``FeatureCenter``'s running mean: the running means keep at least float32 under
    ``.half()``/``.bfloat16()`` (values kept, not a rounded copy), also when built in that dtype,
    through meta + ``to_empty`` + ``reset_parameters`` and a ``state_dict`` round trip; they
    widen with ``.double()``. Stored in 16 bits, means of unit features near 0.9 (float16 ulp
    2^-11, bfloat16 2^-8) froze under momentum 0.002 (updates of ~1e-4, below half an ulp).
    Reference: the same recursion in float64 on the same (rounded) features; the library
    normalises in float32 (rtol 1e-5 over 150 steps)."""
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    k, d, momentum = 3, 6, 0.002
    centres = torch.eye(k, d, dtype=F64) + 0.3 * torch.randn(k, d, generator=gen, dtype=F64)
    drift = torch.randn(k, d, generator=gen, dtype=F64)
    y = torch.arange(12) % k

    def batch(step: int) -> torch.Tensor:
        noise = 0.02 * torch.randn(12, d, generator=gen, dtype=F64)
        return (centres[y] + 0.002 * step * drift[y] + noise).to(dtype)

    def unit_means(features: torch.Tensor) -> torch.Tensor:
        unit = features.double() / features.double().norm(dim=1, keepdim=True)
        return torch.stack([unit[y == c].mean(0) for c in range(k)])

    trained = NearestETFHead(d, k, momentum=momentum).train()
    first = batch(0)
    trained(first.float(), y)  # every class seen: the running means are the batch means
    before = trained.running_means.clone()
    head = trained.to(dtype)
    assert head.running_means.dtype == torch.float32
    assert head.frame.dtype == dtype
    assert torch.equal(head.running_means, before)  # not a rounded copy
    running = unit_means(first)
    for step in range(1, 151):
        features = batch(step)
        running = running + momentum * (unit_means(features) - running)
        head(features, y)
    torch.testing.assert_close(
        head.running_means.double(),
        running,
        rtol=1e-5,
        atol=1e-6,
        msg=lambda m: f"seed {seed}: {m}",
    )
    # it moved: by 0.03 or more over these 150 steps (median 0.066 over 300 seeds); frozen 16-bit
    # means (updates below half an ulp) would not move at all
    moved = float((head.running_means - before).abs().max())
    assert moved > 0.01, f"seed {seed}: the running means moved by {moved} only"
    assert NearestETFHead(d, k, dtype=dtype).running_means.dtype == torch.float32
    with torch.device("meta"):
        deferred = NearestETFHead(d, k)
    deferred = deferred.to(dtype).to_empty(device="cpu")
    deferred.reset_parameters()
    assert deferred.running_means.dtype == torch.float32
    assert torch.equal(deferred.running_means, torch.zeros(k, d))
    deferred.load_state_dict(head.state_dict())
    assert torch.equal(deferred.running_means, head.running_means)
    assert head.double().running_means.dtype == F64  # widened with the module


def test_unlabelled_then_labelled_call_in_one_step_backpropagates() -> None:
    # Semi-supervised steps: a call without labels, then one with labels (which updates the frame
    # buffer in place), then one backward through both.
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    head = NearestETFHead(16, 4, dtype=torch.float64)
    unlabelled = torch.randn(8, 16, generator=g, dtype=torch.float64, requires_grad=True)
    frame_before = head.frame.clone()
    logits = head(unlabelled)
    head(torch.randn(8, 16, generator=g, dtype=torch.float64), torch.arange(4).repeat(2))
    assert not torch.equal(head.frame, frame_before)  # the labelled call moved the frame
    (logits * logits).sum().backward()
    # the unlabelled call's gradient is that of the frame it used
    reference = unlabelled.detach().clone().requires_grad_()
    expected = NearestETFHead(16, 4, dtype=torch.float64)
    expected.frame.copy_(frame_before)
    out = expected(reference)
    (out * out).sum().backward()
    assert unlabelled.grad is not None
    torch.testing.assert_close(unlabelled.grad, reference.grad, msg=f"seed {seed}")


def test_nearest_etf_is_exact_under_autocast() -> None:
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    points = torch.randn(5, 16, generator=torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        frame = nearest_simplex_etf(points)
    assert frame.dtype == torch.float32
    gram = frame.double() @ frame.double().T
    etf = (torch.eye(5, dtype=torch.float64) - 0.2) * 1.25
    # float32 rounding of an SVD product (a few 1e-7), not bfloat16's 1e-3
    torch.testing.assert_close(gram, etf, rtol=0, atol=2e-6, msg=f"seed {seed}")


def test_a_loss_reading_the_head_before_its_labelled_call_trains() -> None:
    """A regularizer that reads the head's classifier before the head's labelled forward in the
    same step (the labelled call moves the frame in place): the backward pass works, with a
    learnable scale too, and the regularizer is that of the frame it read (the one from before
    the move): its value and feature gradient equal the same loss on a copy of that frame."""
    from torchcollapse.losses import SelfDualityLoss

    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.arange(16) % 4
    for learnable in (False, True):
        head = NearestETFHead(6, 4, learnable_scale=learnable, dtype=torch.float64)
        read = head.weight.detach().clone()  # the classifier as the loss will read it
        h = h0.clone().requires_grad_()
        term = SelfDualityLoss(4)(h, y, head)
        logits = head(h, y)
        (F.cross_entropy(logits, y) + term).backward()
        message = f"seed {seed}, learnable scale {learnable}"
        assert not torch.equal(head.weight.detach(), read), f"{message}: the frame did not move"
        assert head.log_scale is None or head.log_scale.grad is not None, message
        reference = h0.clone().requires_grad_()
        expected = SelfDualityLoss(4)(reference, y, read)
        expected.backward()
        assert term.item() == pytest.approx(expected.item(), rel=1e-12), message
        h_ce = h0.clone().requires_grad_()
        F.cross_entropy(head._logits(h_ce, head.frame.clone()), y).backward()
        assert h.grad is not None
        assert reference.grad is not None
        assert h_ce.grad is not None
        torch.testing.assert_close(h.grad, h_ce.grad + reference.grad, rtol=1e-10, atol=1e-12)


def test_a_head_with_a_process_group_deep_copies_and_pickles_without_it() -> None:
    # A ProcessGroup cannot be pickled or deep-copied; an EMA (AveragedModel deep-copies the
    # model) or a checkpoint by pickle of a model with such a head must work all the same: the
    # copy gets process_group=None, the original keeps its group. A real gloo group, in a
    # one-process world.
    import copy
    import pickle

    import torch.distributed as dist

    def work(rank: int, world_size: int) -> list[bool]:
        group = dist.new_group([0])
        seed = int(torch.randint(0, 2**31, ()))
        g = torch.Generator().manual_seed(seed)
        head = NearestETFHead(8, 3, process_group=group, generator=g)
        x, y = torch.randn(12, 8, generator=g), torch.arange(12) % 3
        head(x, y)  # one synchronised step over the group
        checks = []
        for clone in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
            checks.append(clone.process_group is None and head.process_group is group)
            same = all(
                torch.equal(a, b)
                for a, b in zip(head.state_dict().values(), clone.state_dict().values())
            )
            clone(x, y)  # trains, over the world
            checks.append(same)
        averaged = torch.optim.swa_utils.AveragedModel(nn.Sequential(head))
        checks.append(averaged.module[0].process_group is None)
        return checks

    assert run_distributed(work, 1) == [[True] * 5]
