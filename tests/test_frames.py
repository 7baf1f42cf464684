"""Fixed frames against their closed forms, brute-force references and the known optimal codes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests._helpers.ddp import run_distributed
from tests._helpers.devices import foreign_default_device
from torchcollapse import frames
from torchcollapse.frames import (
    DEFAULT_SEED,
    FrameAngleReport,
    frame_angle_report,
    frame_min_angle,
    hierarchy_frame,
    min_angle_bound,
    orthogonal_frame,
    simplex_etf,
    spherical_code,
)
from torchcollapse.heads import SimplexETFHead, SphericalCodeHead

F64 = torch.float64
# Gram matrices built in float64 from a QR factorisation and one product: errors are a few
# hundred ulps (2.2e-16) even at K = 1000, far below the 1e-10 the issue asks for.
GRAM_TOL = 1e-10


def simplex_gram(k: int) -> torch.Tensor:
    return (k / (k - 1)) * (torch.eye(k, dtype=F64) - torch.full((k, k), 1.0 / k, dtype=F64))


def pairwise_angles(frame: torch.Tensor) -> list[float]:
    x = frame.double()
    out = []
    for i, j in itertools.combinations(range(x.shape[0]), 2):
        cosine = float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))
        out.append(math.degrees(math.acos(max(-1.0, min(1.0, cosine)))))
    return out


# ------------------------------------------------------------------------------------------------
# simplex_etf and orthogonal_frame
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "d"),
    [
        (2, 1),
        (2, 7),
        (3, 2),
        (4, 3),
        (10, 9),
        (10, 10),
        (10, 512),
        (100, 99),
        (1000, 999),
        (1000, 1000),
        (1000, 2048),
    ],
)
def test_simplex_etf_gram_is_the_closed_form(k: int, d: int) -> None:
    frame = simplex_etf(k, d, dtype=F64)
    assert frame.shape == (k, d)
    torch.testing.assert_close(frame @ frame.T, simplex_gram(k), rtol=0, atol=GRAM_TOL)
    # the rows sum to zero: the frame is centred, as neural collapse's class means are
    torch.testing.assert_close(frame.sum(0), torch.zeros(d, dtype=F64), rtol=0, atol=GRAM_TOL)


@pytest.mark.parametrize(("k", "d"), [(1, 1), (5, 5), (10, 64), (1000, 1000)])
def test_orthogonal_frame_gram_is_identity(k: int, d: int) -> None:
    frame = orthogonal_frame(k, d, dtype=F64)
    assert frame.shape == (k, d)
    torch.testing.assert_close(frame @ frame.T, torch.eye(k, dtype=F64), rtol=0, atol=GRAM_TOL)


@pytest.mark.parametrize(
    "build",
    [
        lambda g: simplex_etf(6, 8, generator=g, dtype=F64),
        lambda g: orthogonal_frame(6, 8, generator=g, dtype=F64),
        lambda g: spherical_code(9, 3, generator=g, dtype=F64),
        lambda g: hierarchy_frame(torch.eye(4, dtype=F64), 6, generator=g, dtype=F64),
    ],
    ids=["simplex", "orthogonal", "spherical", "hierarchy"],
)
def test_frames_are_deterministic_for_a_seed_and_differ_between_seeds(build) -> None:  # type: ignore[no-untyped-def]
    default = build(None)
    same = build(torch.Generator().manual_seed(DEFAULT_SEED))
    again = build(torch.Generator().manual_seed(DEFAULT_SEED))
    other = build(torch.Generator().manual_seed(1))
    assert torch.equal(default, same)
    assert torch.equal(same, again)
    assert (default - other).abs().max() > 1e-3
    # a generator advances: two draws from one generator differ
    gen = torch.Generator().manual_seed(5)
    assert (build(gen) - build(gen)).abs().max() > 1e-3


def test_frames_take_dtype_and_device_after_a_float64_draw() -> None:
    reference = simplex_etf(5, 7, dtype=F64)
    as_float = simplex_etf(5, 7, dtype=torch.float32, device="cpu")
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float, reference.float())
    assert simplex_etf(5, 7).dtype == torch.get_default_dtype()
    assert simplex_etf(5, 7, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_simplex_etf_below_k_minus_1_names_spherical_code() -> None:
    with pytest.raises(
        ValueError, match=r"at least `num_classes - 1` = 9.*spherical_code\(10, 8\)"
    ):
        simplex_etf(10, 8)
    with pytest.raises(ValueError, match="only two directions"):  # no spherical code in 1-D
        simplex_etf(3, 1)


def test_frame_errors() -> None:
    with pytest.raises(ValueError, match="`num_classes` to be at least 2"):
        simplex_etf(1, 3)
    with pytest.raises(TypeError, match="`num_classes` to be an int"):
        simplex_etf(3.0, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`dim` to be at least `num_classes` = 5"):
        orthogonal_frame(5, 4)
    with pytest.raises(TypeError, match=r"`generator` to be a torch\.Generator"):
        simplex_etf(3, 3, generator=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`dtype` to be a floating dtype"):
        simplex_etf(3, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="`dim` to be at least 2 for 3 classes"):
        spherical_code(3, 1)
    with pytest.raises(ValueError, match="`steps` to be a positive integer"):
        spherical_code(30, 3, steps=0)


# ------------------------------------------------------------------------------------------------
# spherical_code and the angle report
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "d"), [(2, 1), (3, 2), (5, 4), (11, 10), (4, 50)])
def test_spherical_code_is_the_simplex_when_one_exists(k: int, d: int) -> None:
    code = spherical_code(k, d, dtype=F64)
    torch.testing.assert_close(code @ code.T, simplex_gram(k), rtol=0, atol=GRAM_TOL)


@pytest.mark.parametrize(("k", "d"), [(4, 2), (5, 3), (6, 3), (7, 4), (8, 4), (20, 10)])
def test_spherical_code_reaches_90_degrees_up_to_2d(k: int, d: int) -> None:
    code = spherical_code(k, d, dtype=F64)
    torch.testing.assert_close(code.norm(dim=1), torch.ones(k, dtype=F64), rtol=0, atol=1e-12)
    # Rankin: for d + 2 <= K <= 2d the best minimum angle is exactly 90 degrees
    assert min(pairwise_angles(code)) == pytest.approx(90.0, abs=1e-9)


def test_spherical_code_in_the_plane_is_the_regular_polygon() -> None:
    code = spherical_code(7, 2, dtype=F64)
    assert min(pairwise_angles(code)) == pytest.approx(360.0 / 7, abs=1e-9)


# Known optimal minimum angles (Tammes problem; Sloane's tables of spherical codes).
KNOWN_OPTIMA = {
    (7, 3): 77.8695,  # Robinson 1961
    (8, 3): 74.8585,  # square antiprism, Schütte & van der Waerden 1951
    (12, 3): 63.4349,  # icosahedron, arctan(2)
    (24, 3): 43.6908,  # snub cube, Robinson 1961
}


@pytest.mark.parametrize(("k", "d"), list(KNOWN_OPTIMA))
def test_spherical_code_approaches_the_known_optimum(k: int, d: int) -> None:
    code = spherical_code(k, d, dtype=F64)
    achieved = min(pairwise_angles(code))
    # within 0.05 degrees of the optimum (the optimiser's last steps are 1e-5 rad)
    assert achieved == pytest.approx(KNOWN_OPTIMA[(k, d)], abs=0.05)
    assert achieved <= KNOWN_OPTIMA[(k, d)] + 1e-3  # no code beats the optimum


def test_spherical_code_beats_random_points_by_a_wide_margin() -> None:
    k, d = 200, 10
    code = spherical_code(k, d, dtype=F64)
    gen = torch.Generator().manual_seed(123)
    random_best = max(
        frame_min_angle(torch.randn(k, d, generator=gen, dtype=F64)) for _ in range(10)
    )
    achieved = frame_min_angle(code)
    assert achieved > random_best + 15.0, (achieved, random_best)
    assert achieved <= min_angle_bound(k, d)[0]


def test_spherical_code_is_cached_and_advances_the_generator_the_same_way() -> None:
    frames._cached_code.cache_clear()
    gen_miss = torch.Generator().manual_seed(7)
    first = spherical_code(40, 3, steps=50, generator=gen_miss, dtype=F64)
    assert frames._cached_code.cache_info().misses == 1
    gen_hit = torch.Generator().manual_seed(7)
    second = spherical_code(40, 3, steps=50, generator=gen_hit, dtype=F64)
    assert frames._cached_code.cache_info().hits == 1
    assert torch.equal(first, second)
    assert torch.equal(gen_miss.get_state(), gen_hit.get_state())
    # the caller owns its copy: writing into it does not reach the cache
    second.zero_()
    third = spherical_code(40, 3, steps=50, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert torch.equal(third, first)


def test_frame_min_angle_matches_a_brute_force_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    frame = torch.randn(17, 4, generator=gen, dtype=F64) * torch.rand(
        17, 1, generator=gen, dtype=F64
    )
    assert frame_min_angle(frame) == pytest.approx(min(pairwise_angles(frame)), abs=1e-9)
    assert frame_min_angle(torch.eye(3)) == pytest.approx(90.0)


def test_frame_min_angle_is_zero_for_identical_rows() -> None:
    # acos of the largest cosine gave ~1e-6 degrees for about a quarter of such frames (the
    # cosine of a unit row with itself rounds below 1): with 20 frames, a pass by chance of that
    # computation is unlikely (~1e-3)
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        frame = torch.randn(12, 6, generator=gen, dtype=F64)
        frame[7] = 4.0 * frame[3]  # the same direction (scaled exactly: a power of two)
        frame[9] = frame[1]
        assert frame_min_angle(frame) == 0.0, f"seed {seed}"
        assert frame_min_angle(frame.float()) == 0.0, f"seed {seed}"
    assert frame_min_angle(torch.ones(3, 4)) == 0.0


@pytest.mark.parametrize("angle", [1e-8, 1e-6, 1e-3])
def test_frame_min_angle_keeps_a_tiny_angle(angle: float) -> None:
    # two rows at a known angle in a random plane, among well separated random rows. Building the
    # rows in float64 moves them by a few ulps (~1e-16 absolute), so the stored angle is `angle`
    # within ~1e-15 rad: relative 1e-6 at angle 1e-8 leaves a margin of ten. acos of the largest
    # cosine cannot resolve it (cos(1e-8) = 1 - 5e-17 rounds to 1).
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    d = 8
    plane, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=F64))
    u, v = plane[:, 0], plane[:, 1]
    frame = torch.cat(
        [
            torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))[0][:, :6].T,
            torch.stack([u, math.cos(angle) * u + math.sin(angle) * v]),
        ]
    )
    frame = frame[torch.randperm(8, generator=gen)] * torch.rand(8, 1, generator=gen, dtype=F64)
    got = frame_min_angle(frame)
    assert got == pytest.approx(math.degrees(angle), rel=1e-6), f"seed {seed}"


def _count_exact_angles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the pairs that ``frame_min_angle`` measures with the exact formula."""
    counted = [0]
    exact = frames._exact_angles

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        counted[0] += a.shape[0]
        return exact(a, b)

    monkeypatch.setattr(frames, "_exact_angles", counting)
    return counted


@pytest.mark.parametrize("block_elements", [2**12, frames._BLOCK_ELEMENTS])
def test_frame_min_angle_measures_few_pairs_of_an_exact_frame(
    monkeypatch: pytest.MonkeyPatch, block_elements: int
) -> None:
    # every pair of these frames ties within rounding: measuring each exactly cost K^2 d (60-120
    # times the Gram matrix at K = 1000). A chunk of 16 pairs settles the angle; the bound of K
    # leaves room while catching any quadratic count (K (K - 1) = 22,350 pairs here). Small
    # blocks make the later blocks drop their pairs against the angle found in the first.
    monkeypatch.setattr(frames, "_BLOCK_ELEMENTS", block_elements)
    counted = _count_exact_angles(monkeypatch)
    k = 150
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    etf_angle = math.degrees(math.acos(-1.0 / (k - 1)))
    cases = [
        (simplex_etf(k, k, generator=gen, dtype=F64), etf_angle),
        (simplex_etf(k, k + 7, generator=gen, dtype=torch.float32), etf_angle),
        (orthogonal_frame(k, k, generator=gen, dtype=F64), 90.0),
        (torch.eye(k), 90.0),
        (torch.eye(k, dtype=F64)[torch.randperm(k, generator=gen)] * 3.0, 90.0),
    ]
    for frame, expected in cases:
        counted[0] = 0
        # float32 frames are rounded from their float64 construction (~1e-7 of the cosine)
        tolerance = 1e-9 if frame.dtype == F64 else 1e-4
        assert frame_min_angle(frame) == pytest.approx(expected, abs=tolerance)
        assert 0 < counted[0] <= k, f"{counted[0]} pairs measured"


def test_frame_min_angle_finds_the_closest_pair_among_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    # one row of a simplex ETF turned towards another by `delta`: that pair is the closest at
    # exactly theta - delta (any other pair moves by at most delta). Leaving out the pairs that
    # cannot beat the angle found must not lose it; the construction in float64 is good to
    # ~1e-15 rad, the tolerance of 1e-12 rad is at most 1 % of delta.
    monkeypatch.setattr(frames, "_BLOCK_ELEMENTS", 2**11)
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    k = 60
    theta = math.acos(-1.0 / (k - 1))
    for _ in range(5):
        frame = simplex_etf(k, k, generator=gen, dtype=F64)
        i, j = torch.randperm(k, generator=gen)[:2].tolist()
        delta = 10 ** float(torch.empty((), dtype=F64).uniform_(-10, -8, generator=gen))
        u = frame[i]
        w = frame[j] - (frame[j] @ u) * u
        w = w / w.norm()  # (u, w) orthonormal; frame[j] = cos(theta) u + sin(theta) w
        frame[j] = math.cos(theta - delta) * u + math.sin(theta - delta) * w
        got = math.radians(frame_min_angle(frame))
        assert got == pytest.approx(theta - delta, abs=1e-12), f"seed {seed}"


def test_frame_min_angle_of_a_tight_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    # rows at angles phi_i (spread by 1e-9 .. 1e-8 rad) in a random plane, among well separated
    # rows: every Gram entry of the cluster rounds to within rounding of 1, so all its pairs are
    # candidates and are measured in chunks of growing size. The smallest angle is the smallest
    # gap between the sorted phi; the float64 construction is good to ~1e-15 rad (relative 1e-6).
    monkeypatch.setattr(frames, "_BLOCK_ELEMENTS", 2**9)
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    d, cluster = 8, 40
    plane, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=F64))
    gaps = torch.empty(cluster - 1, dtype=F64).uniform_(1e-9, 1e-8, generator=gen)
    phi = torch.cat([gaps.new_zeros(1), gaps.cumsum(0)])
    rows = torch.cos(phi)[:, None] * plane[:, 0] + torch.sin(phi)[:, None] * plane[:, 1]
    others = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))[0][:, :5].T
    frame = torch.cat([rows, others])
    frame = frame[torch.randperm(frame.shape[0], generator=gen)]
    got = math.radians(frame_min_angle(frame))
    assert got == pytest.approx(float(gaps.min()), rel=1e-6), f"seed {seed}"


def test_min_angle_bound_against_closed_forms() -> None:
    for k in (2, 3, 7, 11):
        assert min_angle_bound(k, k - 1) == pytest.approx(
            (math.degrees(math.acos(-1 / (k - 1))), "simplex")
        )
    assert min_angle_bound(5, 3) == (90.0, "orthoplex")
    # In 3 dimensions a cap of radius r covers (1 - cos r) / 2 of the sphere, so K disjoint caps of
    # radius theta/2 give theta <= 2 arccos(1 - 2/K); the numerical integral agrees to 1e-4 deg.
    for k in (12, 24, 100):
        bound, name = min_angle_bound(k, 3)
        assert name == "cap packing"
        assert bound == pytest.approx(math.degrees(2 * math.acos(1 - 2 / k)), abs=1e-4)
    assert min_angle_bound(9, 2) == (40.0, "cap packing")


def test_frame_angle_report() -> None:
    report = frame_angle_report(spherical_code(12, 3, dtype=F64))
    assert isinstance(report, FrameAngleReport)
    assert (report.num_classes, report.dim, report.bound_name) == (12, 3, "cap packing")
    assert not report.bound_attained
    assert report.gap == pytest.approx(report.bound - report.min_angle)
    assert "12 directions in 3 dimensions" in str(report)
    simplex = frame_angle_report(simplex_etf(6, 5))
    assert simplex.bound_attained
    assert simplex.gap == pytest.approx(0.0, abs=1e-5)  # float32 frame
    with pytest.raises(ValueError, match="2-D tensor"):
        frame_min_angle(torch.ones(3))
    with pytest.raises(ValueError, match="nonzero rows"):
        frame_min_angle(torch.zeros(3, 2))


# ------------------------------------------------------------------------------------------------
# hierarchy_frame
# ------------------------------------------------------------------------------------------------


def test_hierarchy_frame_reproduces_a_valid_similarity() -> None:
    gen = torch.Generator().manual_seed(11)
    vectors = torch.randn(6, 4, generator=gen, dtype=F64)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    similarity = vectors @ vectors.T  # a rank-4 correlation matrix
    frame = hierarchy_frame(similarity, 9, dtype=F64)
    assert frame.shape == (6, 9)
    torch.testing.assert_close(frame @ frame.T, similarity, rtol=0, atol=GRAM_TOL)
    assert hierarchy_frame(similarity, dtype=F64).shape == (6, 4)  # default dim: the rank
    with pytest.raises(ValueError, match="at least 4, the rank"):
        hierarchy_frame(similarity, 3)


def nearest_correlation_by_descent(similarity: torch.Tensor) -> torch.Tensor:
    """Independent reference: minimise ||V V^T - S||_F over unit-row V (K x K) by gradient steps."""
    k = similarity.shape[0]
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(k, k, generator=gen, dtype=F64)
    for _ in range(20000):
        v = v / v.norm(dim=1, keepdim=True)
        grad = 4 * (v @ v.T - similarity) @ v
        v = v - 0.02 * grad
    v = v / v.norm(dim=1, keepdim=True)
    return v @ v.T


def test_hierarchy_frame_projects_an_invalid_similarity_to_the_nearest_gram() -> None:
    # pairwise cosines that no unit vectors have: 0.9, 0.9 and -0.9 (indefinite matrix)
    similarity = torch.tensor(
        [[1.0, 0.9, 0.9, 0.0], [0.9, 1.0, -0.9, 0.2], [0.9, -0.9, 1.0, 0.1], [0.0, 0.2, 0.1, 1.0]],
        dtype=F64,
    )
    assert float(torch.linalg.eigvalsh(similarity).min()) < -0.5
    frame = hierarchy_frame(similarity, 4, dtype=F64)
    gram = frame @ frame.T
    assert float(torch.linalg.eigvalsh(gram).min()) > -1e-12
    torch.testing.assert_close(gram.diagonal(), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
    # the non-convex descent reference reaches the same optimum up to its own accuracy
    torch.testing.assert_close(gram, nearest_correlation_by_descent(similarity), rtol=0, atol=1e-5)


def test_hierarchy_frame_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        hierarchy_frame(torch.ones(3, 4))
    with pytest.raises(TypeError, match="`similarity` to be a Tensor"):
        hierarchy_frame([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite floating-point"):
        hierarchy_frame(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]))


def test_sizes_are_any_integer_as_the_heads_take_them() -> None:
    import numpy as np

    similarity = torch.tensor([[1.0, 0.5, -0.3], [0.5, 1.0, -0.3], [-0.3, -0.3, 1.0]])
    integers = (np.int64, np.int32, lambda n: torch.tensor(n), lambda n: torch.tensor([n]))
    for wrap in integers:
        # the same frame as with Python ints (the generator draws the same numbers)
        calls = [
            (simplex_etf, (10, 16), {}),
            (orthogonal_frame, (5, 8), {}),
            (spherical_code, (7, 3), {"steps": 20}),
            (hierarchy_frame, (similarity, 5), {"max_iter": 50}),
        ]
        for function, args, kwargs in calls:
            expected = function(*args, **kwargs, dtype=F64)  # type: ignore[operator]
            wrapped = tuple(wrap(a) if isinstance(a, int) else a for a in args)
            wrapped_kwargs = {key: wrap(value) for key, value in kwargs.items()}
            got = function(*wrapped, **wrapped_kwargs, dtype=F64)  # type: ignore[operator]
            assert torch.equal(got, expected), function.__name__
        assert min_angle_bound(wrap(7), wrap(3)) == min_angle_bound(7, 3)
    # wrong types are type errors, sizes out of range value errors, naming the argument
    for bad in (True, np.bool_(True), torch.tensor(True), 10.0, np.float64(10.0), "10", None):
        with pytest.raises(TypeError, match="`num_classes` to be an int"):
            simplex_etf(bad, 16)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="`dim` to be an int"):
            orthogonal_frame(4, bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="`steps` to be an int"):
            spherical_code(7, 3, steps=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="`max_iter` to be an int"):
            hierarchy_frame(similarity, 5, max_iter=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`num_classes` to be an integer, but got Tensor"):
        spherical_code(torch.tensor([7, 8]), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_classes` to be at least 2, but got 1"):
        simplex_etf(np.int64(1), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`dim` to be a positive integer, but got 0"):
        min_angle_bound(3, torch.tensor(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_iter` to be a positive integer"):
        hierarchy_frame(similarity, max_iter=np.int64(0))  # type: ignore[arg-type]
    # the tolerance of hierarchy_frame: a real number >= 0
    expected = hierarchy_frame(similarity, 5, tol=1e-9, dtype=F64)
    for tol in (np.float32(1e-9), torch.tensor(1e-9, dtype=F64)):
        assert torch.equal(hierarchy_frame(similarity, 5, tol=tol, dtype=F64), expected)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`tol` to be a real number, but got str"):
        hierarchy_frame(similarity, tol="1e-9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`tol` to be a number >= 0"):
        hierarchy_frame(similarity, tol=-1.0)


# ------------------------------------------------------------------------------------------------
# Every process builds the same frames without a broadcast
# ------------------------------------------------------------------------------------------------


def _build_everything(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    similarity = torch.tensor([[1.0, 0.5, -0.3], [0.5, 1.0, -0.3], [-0.3, -0.3, 1.0]])
    return {
        "simplex": simplex_etf(10, 16),
        "orthogonal": orthogonal_frame(5, 8),
        "spherical": spherical_code(30, 4),
        "hierarchy": hierarchy_frame(similarity, 5),
        "simplex_head": SimplexETFHead(32, 10).frame,
        "spherical_head": SphericalCodeHead(3, 12).frame,
    }


@pytest.mark.ddp
def test_frames_are_identical_on_every_process_without_a_broadcast() -> None:
    ranks = run_distributed(_build_everything, 2)
    assert ranks[0].keys() == ranks[1].keys()
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name
    # and they are the frames this process builds (up to the thread count's rounding)
    here = _build_everything(0, 1)
    for name, tensor in ranks[0].items():
        torch.testing.assert_close(tensor, here[name], rtol=0, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------
# Under a default-device context the frames are still drawn on the CPU
# ------------------------------------------------------------------------------------------------

SIMILARITY = torch.tensor([[1.0, 0.5, -0.3], [0.5, 1.0, -0.3], [-0.3, -0.3, 1.0]])
DRAWN_FRAMES = {
    "simplex": lambda g: simplex_etf(6, 8, generator=g, dtype=F64),
    "orthogonal": lambda g: orthogonal_frame(6, 8, generator=g, dtype=F64),
    "spherical, simplex": lambda g: spherical_code(4, 5, generator=g, dtype=F64),
    "spherical, orthoplex": lambda g: spherical_code(7, 4, generator=g, dtype=F64),
    "spherical, polygon": lambda g: spherical_code(7, 2, generator=g, dtype=F64),
    "spherical, descent": lambda g: spherical_code(9, 3, steps=20, generator=g, dtype=F64),
    "hierarchy": lambda g: hierarchy_frame(SIMILARITY, 5, generator=g, dtype=F64),
}


@pytest.mark.parametrize("name", list(DRAWN_FRAMES))
def test_frames_are_drawn_on_the_cpu_under_a_default_device_context(name: str) -> None:
    # As torch.randn: device=None is the context's device (meta: no values), but the draw is
    # the CPU's, so the generator advances as without the context; and a default device that
    # a CPU generator cannot draw on (CUDA, simulated) gives the CPU frame.
    build = DRAWN_FRAMES[name]
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    eager_gen = torch.Generator().manual_seed(seed)
    eager = build(eager_gen)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        meta = build(gen)
    assert meta.is_meta, f"{name}, seed {seed}"
    assert meta.shape == eager.shape
    assert torch.equal(gen.get_state(), eager_gen.get_state()), f"{name}, seed {seed}"
    gen = torch.Generator().manual_seed(seed)
    with foreign_default_device():
        foreign = build(gen)
    assert torch.equal(foreign, eager), f"{name}, seed {seed}"
    assert torch.equal(gen.get_state(), eager_gen.get_state()), f"{name}, seed {seed}"
    assert build(None).device.type == "cpu"
    on_meta = simplex_etf(4, 5, device="meta")  # an explicit device wins over the default
    assert on_meta.is_meta


def test_frame_reports_and_nearest_etf_work_under_a_default_device_context() -> None:
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    points = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed), dtype=F64)
    code = spherical_code(9, 3, steps=20, dtype=F64)
    expected = (frame_angle_report(code), min_angle_bound(30, 4), frame_min_angle(points))
    nearest = frames.nearest_simplex_etf(points)
    for context in (lambda: torch.device("meta"), foreign_default_device):
        with context():
            got = (frame_angle_report(code), min_angle_bound(30, 4), frame_min_angle(points))
            assert torch.equal(frames.nearest_simplex_etf(points), nearest), f"seed {seed}"
        assert got == expected, f"seed {seed}"
