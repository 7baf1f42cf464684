"""The imbalance recipe: minority-collapse maths against loops, tiny runs, resume, findings."""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import imbalance
import pytest
import torch
from harness.data import Dataset, Split
from harness.longtail import long_tail_counts
from harness.outputs import Stat, read_csv
from imbalance import METHODS, findings, mean_pairwise_cosine, minority_collapse, run_name

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--train-samples", "400", "--test-samples", "100", "--batch-size", "64", "--width", "8",
    "--epochs", "1", "--eval-every", "1", "--seeds", "0", "--no-progress", "--ratios", "2", "5",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("mnist1d-cache"))


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_minority_collapse_matches_loops() -> None:
    g = torch.Generator().manual_seed(0)
    for k, d in ((4, 3), (10, 16), (7, 5)):
        weight = torch.randn(k, d, generator=g, dtype=torch.float64)
        means = 3 + torch.randn(k, d, generator=g, dtype=torch.float64)
        minority = torch.zeros(k, dtype=torch.bool)
        minority[k // 2 :] = True
        out = minority_collapse(weight, means, minority)
        w, centre = weight.tolist(), (means - means.mean(0)).tolist()
        tail = [c for c in range(k) if minority[c]]
        head = [c for c in range(k) if not minority[c]]
        pairs = list(itertools.combinations(tail, 2))
        # float64 sums of <= 45 terms: agreement to ~1e-15; 1e-12 is generous.
        assert out["minority_w_cos"] == pytest.approx(
            sum(_cos(w[i], w[j]) for i, j in pairs) / len(pairs), abs=1e-12
        )
        assert out["minority_mean_cos"] == pytest.approx(
            sum(_cos(centre[i], centre[j]) for i, j in pairs) / len(pairs), abs=1e-12
        )
        norm = [math.sqrt(sum(x * x for x in row)) for row in w]
        ratio = (sum(norm[c] for c in tail) / len(tail)) / (sum(norm[c] for c in head) / len(head))
        assert out["w_norm_ratio"] == pytest.approx(ratio, rel=1e-12)
        head_pairs = list(itertools.combinations(head, 2))
        assert out["majority_w_cos"] == pytest.approx(
            sum(_cos(w[i], w[j]) for i, j in head_pairs) / len(head_pairs), abs=1e-12
        )


def test_simplex_etf_gives_the_reference_values() -> None:
    from torchcollapse.frames import simplex_etf

    for k, d in ((10, 9), (5, 32)):
        etf = simplex_etf(k, d).double()
        out = minority_collapse(etf, etf + 7.0, torch.arange(k) >= 2)  # offset: centring removes it
        assert out["minority_w_cos"] == pytest.approx(-1 / (k - 1), abs=1e-6)
        assert out["minority_mean_cos"] == pytest.approx(-1 / (k - 1), abs=1e-6)
        assert out["w_norm_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_mean_pairwise_cosine_and_errors() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(6, 4, generator=g, dtype=torch.float64)
    rows = v.tolist()
    pairs = list(itertools.combinations(range(6), 2))
    assert mean_pairwise_cosine(v) == pytest.approx(
        sum(_cos(rows[i], rows[j]) for i, j in pairs) / len(pairs), abs=1e-12
    )
    with pytest.raises(ValueError, match="two rows"):
        mean_pairwise_cosine(v[:1])
    with pytest.raises(ValueError, match="same shape"):
        minority_collapse(v, v[:, :2], torch.arange(6) > 2)
    with pytest.raises(ValueError, match="at least two"):
        minority_collapse(v, v, torch.arange(6) > 4)
    with pytest.raises(ValueError, match="majority"):
        minority_collapse(v, v, torch.ones(6, dtype=torch.bool))


def test_per_class_test_accuracy_is_nan_for_a_class_without_test_samples() -> None:
    from harness.models import build_model
    from harness.train import Runtime

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    k = 4
    train = Split(torch.randn(40, 1, 40, generator=g), torch.arange(40) % k)
    test_y = torch.randint(0, k - 1, (30,), generator=g)  # class k-1 has no test sample
    test = Split(torch.randn(30, 1, 40, generator=g), test_y)
    data = Dataset("mnist1d", train, test, k)
    model = build_model("mlp", (1, 40), k, width=8, feature_dim=6).eval()
    minority = torch.tensor([False, False, True, True])
    row = imbalance.evaluate_imbalance(model, data, Runtime(), minority)
    with torch.no_grad():
        pred = model(test.inputs).argmax(dim=1)
    for c in range(k - 1):  # brute force: the fraction of class c's test samples predicted c
        members = test_y == c
        expected = (pred[members] == c).double().mean().item() if members.any() else math.nan
        assert row[f"test_acc_c{c}"] == pytest.approx(expected, rel=0, abs=1e-12, nan_ok=True)
    assert math.isnan(row[f"test_acc_c{k - 1}"])  # no samples: no accuracy, not 0


def test_long_tail_subset_has_exact_counts() -> None:
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 10, (2000,), generator=g)
    split = Split(torch.randn(2000, 1, 4, generator=g), targets)
    data = Dataset("mnist1d", split, split, 10)
    counts = long_tail_counts(10, int(torch.bincount(targets).min()), 10, "exponential")
    subset = imbalance.long_tail_subset(data, counts, seed=0)
    assert torch.bincount(subset.train.targets, minlength=10).tolist() == counts
    assert subset.test is data.test


def test_tiny_run_writes_outputs_and_resumes(tmp_path: Path, cache: str) -> None:
    out = tmp_path / "run"
    report = imbalance.main([*TINY, "--cache-dir", cache, "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["methods"] == list(METHODS)
    rows = read_csv(out / "metrics.csv")
    assert sorted((r["run"], r["epoch"]) for r in rows) == sorted(
        (run_name(m, r), 1) for m in METHODS for r in (2, 5)
    )
    for row in rows:
        for key in ("test_bal_acc", "test_tail_acc", "minority_w_cos", "train_nc1", "train_nc3"):
            assert math.isfinite(row[key]), (key, row)
        per_class = [row[f"test_acc_c{c}"] for c in range(10)]
        assert row["test_bal_acc"] == pytest.approx(sum(per_class) / 10, abs=1e-12)
        if row["run"].startswith("etf"):
            # The fixed frame: minority classifier cosine is the simplex value, norms are equal.
            assert row["minority_w_cos"] == pytest.approx(-1 / 9, abs=1e-5)
            assert row["w_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    text = report.read_text()
    for ratio in (2, 5):
        assert f"- ratio {ratio}:" in text
        assert f"**Ratio {ratio}**" in text
    for png in ("per_class.png", "minority_collapse.png", "curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "**Minority collapse (linear + CE).**" in text
    assert "**Balanced accuracy at ratio 5**" in text

    before = (out / "metrics.csv").read_text()
    imbalance.main(["--resume", "--out", str(out), "--no-progress"])
    after = read_csv(out / "metrics.csv")
    assert [(r["run"], r["epoch"]) for r in after] == [(r["run"], r["epoch"]) for r in rows]
    assert before.splitlines()[0] == (out / "metrics.csv").read_text().splitlines()[0]


def test_report_lists_the_exact_profile_counts(tmp_path: Path, cache: str) -> None:
    args = [*TINY, "--methods", "linear_ce", "--ratios", "3", "--profile", "exponential"]
    report = imbalance.main([*args, "--cache-dir", cache, "--out", str(tmp_path)])
    from harness.data import load_dataset

    full = load_dataset("mnist1d", cache=cache, train_samples=400)
    n_max = int(torch.bincount(full.train.targets, minlength=10).min())
    counts = long_tail_counts(10, n_max, 3, "exponential")
    assert f"- ratio 3: {sum(counts)} training samples, per class {counts}" in report.read_text()


def test_cifar10_lt_path_runs_on_a_fake_pickle_folder(tmp_path: Path) -> None:
    # The CIFAR code path (uint8 images, augmentation, ResNet-18) on 20 random images per class.
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, per_class in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        labels = torch.arange(10).repeat(per_class)
        images = torch.randint(0, 256, (len(labels), 3 * 32 * 32), generator=g, dtype=torch.uint8)
        with (folder / name).open("wb") as handle:
            pickle.dump({"data": images.numpy(), "labels": labels.tolist()}, handle)
    args = [
        "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--model", "resnet18",
        "--width", "4", "--feature-dim", "16", "--profile", "exponential", "--ratios", "10",
        "--methods", "linear_ce", "etf_dr", "--epochs", "1", "--batch-size", "32", "--seeds", "0",
        "--no-progress", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    report = imbalance.main(args)
    counts = long_tail_counts(10, 20, 10, "exponential")
    assert f"- ratio 10: {sum(counts)} training samples, per class {counts}" in report.read_text()
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert sorted(r["run"] for r in rows) == ["etf_dr_r10", "linear_ce_r10"]
    assert all(math.isfinite(r["minority_mean_cos"]) for r in rows)


def _summary(tail_cos_hi: float, etf_mean_cos: float, dr_acc: float) -> dict[str, dict[str, Stat]]:
    def run(w_cos: float, mean_cos: float, acc: float) -> dict[str, Stat]:
        return {
            "minority_w_cos": Stat(w_cos, 0.02, 3),
            "minority_mean_cos": Stat(mean_cos, 0.02, 3),
            "w_norm_ratio": Stat(0.8, 0.05, 3),
            "test_bal_acc": Stat(acc, 0.01, 3),
            "test_tail_acc": Stat(acc - 0.2, 0.02, 3),
        }

    return {
        run_name("linear_ce", 10): run(0.0, 0.0, 0.80),
        run_name("linear_ce", 100): run(tail_cos_hi, 0.5, 0.60),
        run_name("etf_dr", 10): run(-1 / 9, -0.1, 0.82),
        run_name("etf_dr", 100): run(-1 / 9, etf_mean_cos, dr_acc),
    }


def test_findings_follow_the_numbers() -> None:
    methods = ["linear_ce", "etf_dr"]
    held = " ".join(findings(_summary(0.6, -0.05, 0.70), [10, 100], methods, 10))
    assert "move together as the ratio grows held" in held
    assert "keeps them further apart held" in held
    assert "ETF + dot regression 0.7 ± 0.01, higher (beyond the spread)" in held
    assert "That a fixed ETF buys balanced accuracy held" in held
    assert "ratio 100: ETF + dot regression" in held
    failed = " ".join(findings(_summary(-0.3, 0.9, 0.50), [10, 100], methods, 10))
    assert "move together as the ratio grows did not hold here" in failed
    assert "keeps them further apart did not hold here" in failed
    assert "ETF + dot regression 0.5 ± 0.01, lower (beyond the spread)" in failed
    assert "That a fixed ETF buys balanced accuracy did not hold here" in failed
    within = " ".join(findings(_summary(0.01, 0.49, 0.605), [10, 100], methods, 10))
    assert "pointed that way, but within the spread over seeds" in within


@pytest.mark.ddp
def test_torchrun_two_processes_match_one_process(tmp_path: Path, cache: str) -> None:
    args = [*TINY, "--methods", "linear_bsl", "etf_dr_rw", "--ratios", "4", "--cache-dir", cache]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "recipes")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "recipes" / "imbalance.py"), *args, "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    imbalance.main([*args, "--out", str(tmp_path / "one")])
    ddp = read_csv(tmp_path / "ddp" / "metrics.csv")
    one = read_csv(tmp_path / "one" / "metrics.csv")
    assert [(r["run"], r["epoch"]) for r in ddp] == [(r["run"], r["epoch"]) for r in one]
    for a, b in zip(ddp, one):
        for column in ("loss", "test_bal_acc", "test_tail_acc", "minority_w_cos", "train_nc1"):
            # same global batches; float32 reductions in another order drift ~1e-6 relative
            assert a[column] == pytest.approx(b[column], rel=1e-4, abs=1e-6), column


def test_too_few_minority_classes_fail_before_training(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 0.1 of 10 classes is one minority class: the minority-collapse measures need two, so the
    # study must stop before it trains anything.
    trained: list[str] = []
    monkeypatch.setattr(imbalance.Experiment, "run", lambda self, *a, **k: trained.append("run"))
    with pytest.raises(ValueError, match="`minority_fraction` to make between 2 and 9"):
        imbalance.main(
            [*TINY, "--minority-fraction", "0.1", "--cache-dir", cache, "--out", str(tmp_path)]
        )
    assert not trained
