"""Long-tail profiles and the subsampler: counts match the formulas and the published splits."""

from __future__ import annotations

import decimal
import itertools
import math

import pytest
import torch
from harness.longtail import head_tail_split, long_tail_counts, long_tail_indices


def _exponential_reference(num_classes: int, max_count: int, ratio: int) -> list[int]:
    # The same formula in 60-digit decimal arithmetic: an independent, rounding-free reference.
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        out = []
        for c in range(num_classes):
            power = decimal.Decimal(ratio) ** (
                decimal.Decimal(-c) / decimal.Decimal(num_classes - 1)
            )
            out.append(
                int((decimal.Decimal(max_count) * power).to_integral_value(decimal.ROUND_FLOOR))
            )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exponential_counts_match_high_precision_formula(seed: int) -> None:
    rng = torch.Generator().manual_seed(seed)
    for _ in range(20):
        k = int(torch.randint(2, 120, (1,), generator=rng))
        n_max = int(torch.randint(50, 6000, (1,), generator=rng))
        ratio = int(torch.randint(1, 51, (1,), generator=rng))
        counts = long_tail_counts(k, n_max, ratio, "exponential")
        assert counts == _exponential_reference(k, n_max, ratio)
        assert counts[0] == n_max
        assert all(a >= b for a, b in itertools.pairwise(counts))


@pytest.mark.parametrize(
    ("num_classes", "ratio", "total"),
    # Training-set sizes of CIFAR-10-LT / CIFAR-100-LT (n_max = 5000 / 500) reported by
    # Cui et al. (2019, Table 2 setup) and Cao et al. (2019), used by every later paper.
    [(10, 100, 12406), (10, 50, 13996), (10, 10, 20431), (100, 100, 10847), (100, 10, 19573)],
)
def test_exponential_totals_match_published_cifar_lt(
    num_classes: int, ratio: int, total: int
) -> None:
    n_max = 5000 if num_classes == 10 else 500
    counts = long_tail_counts(num_classes, n_max, ratio)
    assert sum(counts) == total
    assert counts[-1] == n_max // ratio


@pytest.mark.parametrize(
    ("num_classes", "ratio", "mu"), [(10, 100, 0.5), (7, 10, 0.5), (5, 3, 0.2)]
)
def test_step_counts(num_classes: int, ratio: int, mu: float) -> None:
    counts = long_tail_counts(num_classes, 400, ratio, "step", minority_fraction=mu)
    num_minority = math.floor(mu * num_classes)
    expected = [400] * (num_classes - num_minority) + [400 // ratio] * num_minority
    assert counts == expected


def test_ratio_one_is_balanced() -> None:
    assert long_tail_counts(6, 123, 1) == [123] * 6
    assert long_tail_counts(6, 123, 1, "step") == [123] * 6


@pytest.mark.parametrize("profile", ["exponential", "step"])
def test_indices_have_exact_counts(profile: str) -> None:
    rng = torch.Generator().manual_seed(3)
    target = torch.randint(0, 10, (4000,), generator=rng)
    n_max = int(torch.bincount(target).min())
    for ratio in (10, 100):
        counts = long_tail_counts(10, n_max, ratio, profile)  # type: ignore[arg-type]
        idx = long_tail_indices(target, counts, generator=torch.Generator().manual_seed(0))
        assert torch.bincount(target[idx], minlength=10).tolist() == counts
        assert len(torch.unique(idx)) == len(idx)  # without replacement
        assert torch.equal(idx, torch.sort(idx).values)


def test_indices_are_deterministic_per_seed_and_vary_across_seeds() -> None:
    target = torch.arange(10).repeat(100)
    counts = long_tail_counts(10, 100, 10)
    a = long_tail_indices(target, counts, generator=torch.Generator().manual_seed(5))
    b = long_tail_indices(target, counts, generator=torch.Generator().manual_seed(5))
    c = long_tail_indices(target, counts, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_indices_are_uniform_within_class() -> None:
    # Keeping 1 of 4 samples of a class, each sample should be kept ~1/4 of the time.
    target = torch.zeros(4, dtype=torch.long)
    hits = torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    draws = 4000
    for _ in range(draws):
        hits[long_tail_indices(target, [1], generator=gen)] += 1
    # Binomial(4000, 1/4): std ~27; 6 std is a bound that a correct sampler never crosses.
    assert torch.all((hits - draws / 4).abs() < 6 * math.sqrt(draws * 0.25 * 0.75))


def test_head_tail_split_matches_brute_force() -> None:
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        k = int(torch.randint(2, 20, (1,), generator=rng))
        counts = torch.randint(1, 6, (k,), generator=rng).tolist()
        head, tail = head_tail_split(counts)
        num_tail = k // 2
        assert int(tail.sum()) == num_tail
        assert torch.equal(head, ~tail)
        # Every tail class has at most the count of every head class; ties go to higher indices.
        for t in torch.nonzero(tail).flatten().tolist():
            for h in torch.nonzero(head).flatten().tolist():
                assert counts[t] < counts[h] or (counts[t] == counts[h] and t > h)
    head, tail = head_tail_split(long_tail_counts(10, 100, 10, "step"))
    assert tail.tolist() == [False] * 5 + [True] * 5


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        long_tail_counts(1, 10, 10)
    with pytest.raises(ValueError, match="max_count"):
        long_tail_counts(10, 0, 10)
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tail_counts(10, 10, 0.5)
    with pytest.raises(ValueError, match="profile"):
        long_tail_counts(10, 10, 10, "linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="minority_fraction"):
        long_tail_counts(10, 10, 10, "step", minority_fraction=1.0)
    with pytest.raises(ValueError, match="at least 1"):
        long_tail_counts(10, 10, 100)
    with pytest.raises(ValueError, match="target"):
        long_tail_indices(torch.zeros(3, 2, dtype=torch.long), [1, 1])
    with pytest.raises(ValueError, match="target"):
        long_tail_indices(torch.tensor([0.0, 1.0]), [1, 1])
    with pytest.raises(ValueError, match="labels in"):
        long_tail_indices(torch.tensor([0, 2]), [1, 1])
    with pytest.raises(ValueError, match=r"counts\[1\]"):
        long_tail_indices(torch.tensor([0, 1]), [1, 2])
    with pytest.raises(ValueError, match="tail_fraction"):
        head_tail_split([3, 2, 1], tail_fraction=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        head_tail_split([3, 2, 1], tail_fraction=0.2)
