"""The transfer recipe: class split, frozen-feature metrics, tiny runs, correlations, findings."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transfer
from harness.data import Dataset, Split
from harness.outputs import Stat, final_rows, read_csv
from transfer import RUNS, correlations, findings, split_classes

from tests._helpers.ddp import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--train-samples", "600", "--test-samples", "200", "--batch-size", "64", "--width", "8",
    "--epochs", "1", "--eval-every", "1", "--seeds", "0", "--no-progress", "--shots", "1", "5",
    "--draws", "3", "--permutations", "200",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("mnist1d-cache"))


def test_split_classes_relabels_and_keeps_every_sample() -> None:
    g = torch.Generator().manual_seed(0)
    y_train, y_test = (
        torch.randint(0, 10, (300,), generator=g),
        torch.randint(0, 10, (80,), generator=g),
    )
    x_train, x_test = torch.randn(300, 1, 3, generator=g), torch.randn(80, 1, 3, generator=g)
    data = Dataset("mnist1d", Split(x_train, y_train), Split(x_test, y_test), 10)
    source, target = split_classes(data, 4)
    assert (source.num_classes, target.num_classes) == (4, 6)
    for part, full_x, full_y in ((source.train, x_train, y_train), (source.test, x_test, y_test)):
        keep = [i for i in range(len(full_y)) if int(full_y[i]) < 4]
        assert part.targets.tolist() == [int(full_y[i]) for i in keep]
        assert torch.equal(part.inputs, full_x[keep])
    for part, full_x, full_y in ((target.train, x_train, y_train), (target.test, x_test, y_test)):
        keep = [i for i in range(len(full_y)) if int(full_y[i]) >= 4]
        assert part.targets.tolist() == [int(full_y[i]) - 4 for i in keep]
        assert torch.equal(part.inputs, full_x[keep])
    with pytest.raises(ValueError, match="source_classes"):
        split_classes(data, 9)


def test_tiny_run_writes_transfer_columns_plots_and_report(tmp_path: Path, cache: str) -> None:
    runs = ["ce", "reg_neg", "etf"]
    report = transfer.main([*TINY, "--runs", *runs, "--cache-dir", cache, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "config.json").read_text())["runs"] == runs
    rows = read_csv(tmp_path / "metrics.csv")
    finals = final_rows(rows, "probe_acc")
    assert sorted(r["run"] for r in finals) == sorted(runs)
    for row in finals:
        for key in ("source_nc1", "target_nc1", "target_cdnv", "ncm_1shot_acc", "ncm_all_acc"):
            assert math.isfinite(row[key]), (key, row)
            assert row[key] >= 0, (key, row)
        for key in ("probe_acc", "ncm_1shot_acc", "ncm_5shot_acc", "ncm_all_acc"):
            assert 0.0 <= row[key] <= 1.0
        assert row["probe_grad_norm"] < 1e-6  # the probe reached its optimum
    for png in ("scatter.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    text = report.read_text()
    for run in runs:
        assert f"| {RUNS[run]} | 1 |" in text
    assert "**Claim 1: more collapse on the source hurts a full-data linear probe**" in text
    assert "| NCM 5-shot |" in text

    transfer.main(["--resume", "--out", str(tmp_path), "--no-progress"])
    again = final_rows(read_csv(tmp_path / "metrics.csv"), "probe_acc")
    for a, b in zip(sorted(finals, key=str), sorted(again, key=str)):
        # a finished run is reloaded, not retrained: the same features, the same evaluations
        for key in ("probe_acc", "ncm_1shot_acc", "target_cdnv", "source_nc1"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12)


def test_cifar100_path_runs_on_a_fake_pickle_folder(tmp_path: Path) -> None:
    # CIFAR-100: 80 source and 20 target classes by default; 3 random train images per class.
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, per_class in (("train", 3), ("test", 2)):
        labels = torch.arange(100).repeat(per_class)
        images = torch.randint(0, 256, (len(labels), 3 * 32 * 32), generator=g, dtype=torch.uint8)
        with (folder / name).open("wb") as handle:
            pickle.dump({"data": images.numpy(), "fine_labels": labels.tolist()}, handle)
    args = [
        "--dataset", "cifar100", "--data-root", str(tmp_path / "data"), "--model", "resnet18",
        "--width", "4", "--feature-dim", "16", "--runs", "ce", "reg_target", "--epochs", "1",
        "--batch-size", "64", "--seeds", "0", "--shots", "1", "2", "--draws", "2",
        "--permutations", "50", "--no-progress", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    report = transfer.main(args)
    assert "source classes 0-79" in report.read_text()
    finals = final_rows(read_csv(tmp_path / "run" / "metrics.csv"), "probe_acc")
    assert sorted(r["run"] for r in finals) == ["ce", "reg_target"]
    for row in finals:
        assert 0.0 <= row["ncm_2shot_acc"] <= 1.0
        assert math.isfinite(row["target_cdnv"])


def _finals(probe_sign: float, fewshot_sign: float, seeds: int = 3) -> list[dict[str, object]]:
    # Six runs per seed whose accuracies are monotone in the predictors; within a run the seeds
    # shift predictor and accuracy consistently, so the pooled ranks agree exactly (|rho| = 1).
    rows = []
    for seed in range(seeds):
        for i, run in enumerate(RUNS):
            nc1 = 0.1 * (i + 1) * (1 + 0.01 * seed)
            cdnv = 0.05 * (6 - i) * (1 - 0.01 * seed)
            shift = 1e-4 * seed
            rows.append({
                "run": run, "seed": seed, "source_nc1": nc1, "target_nc1": 2 * nc1,
                "target_cdnv": cdnv, "probe_acc": 0.5 + probe_sign * (0.05 * i + shift),
                "ncm_1shot_acc": 0.4 - fewshot_sign * (0.04 * (6 - i) - shift),
                "ncm_all_acc": 0.6 + shift,
            })  # fmt: skip
    return rows


def test_correlations_pool_points_and_split_by_seed() -> None:
    finals = _finals(+1, +1)
    corr = correlations(finals, "source_nc1", "probe_acc", permutations=2000)
    assert corr.rho == pytest.approx(1.0, abs=1e-12)
    assert corr.points == 18
    assert corr.per_seed.n == 3
    assert corr.per_seed.mean == pytest.approx(1.0)
    assert corr.p_value < 0.01
    assert math.isnan(correlations(finals[:2], "source_nc1", "probe_acc").rho)  # too few points


def test_findings_follow_the_numbers() -> None:
    config = transfer.TransferConfig(shots=(1,), out="unused")

    def arm(bounded: float, nc1: float, probe: float) -> dict[str, Stat]:
        return {
            "source_nc1_bounded": Stat(bounded, 0.01, 3),
            "source_nc1": Stat(nc1, 0.01, 3),
            "probe_acc": Stat(probe, 0.01, 3),
        }

    summary = {
        "reg_neg": arm(0.5, 0.6, 0.8),
        "ce": arm(0.3, 0.3, 0.75),
        "reg_pos": arm(0.1, 0.1, 0.7),
    }
    held = " ".join(findings(summary, _finals(+1, +1), config))
    assert "(ρ > 0). Found ρ = +1.00" in held
    assert "held (significant pooled, and consistent across seeds)" in held
    assert "(decreasing, as intended); NC1 was 0.6 ± 0.01 / 0.3 ± 0.01 / 0.1 ± 0.01" in held
    assert "(decreasing with collapse; CE + reg. (NC1 weight < 0) vs" in held
    summary["ce"] = arm(0.6, 0.05, 0.9)
    assert "(NOT monotone); NC1 was" in " ".join(findings(summary, _finals(+1, +1), config))
    assert "1-shot: ρ = -1.00" in held
    reversed_ = " ".join(findings(summary, _finals(-1, -1), config))
    assert "(ρ > 0). Found ρ = -1.00" in reversed_
    assert reversed_.count("did not hold here") == 2


def _penultimate_rank(rank: int, world_size: int, model: object, data: Dataset) -> Split:
    from harness.train import Runtime

    return transfer._penultimate(model, data, data.train, Runtime(rank, world_size))  # type: ignore[arg-type]


@pytest.mark.ddp
def test_penultimate_gathers_the_features_in_sample_order() -> None:
    # The few-shot support is drawn by position, so the gathered features must keep the split's
    # order (not rank 0's shard, then rank 1's) for N processes to pick the samples one does.
    from harness.models import build_model

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n = 7  # odd: the shards differ in size
    split = Split(torch.randn(n, 1, 40, generator=g), torch.randint(0, 3, (n,), generator=g))
    data = Dataset("mnist1d", split, split, 3)
    model = build_model("mlp", (1, 40), 3, width=8, feature_dim=4).eval()
    with torch.no_grad():  # float64 reference, one sample at a time
        expected = torch.cat(
            [model.double().forward_features(x[None].double()) for x in split.inputs]
        )
    model.float()
    for rank_split in run_distributed(_penultimate_rank, 2, model, data):
        assert torch.equal(rank_split.targets, split.targets)
        # float32 forward passes against float64: a few float32 roundings of O(1) values
        torch.testing.assert_close(rank_split.inputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.ddp
def test_torchrun_two_processes_match_one_process(tmp_path: Path, cache: str) -> None:
    args = [*TINY, "--runs", "reg_pos", "--cache-dir", cache]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "recipes")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "recipes" / "transfer.py"), *args, "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    transfer.main([*args, "--out", str(tmp_path / "one")])
    ddp = final_rows(read_csv(tmp_path / "ddp" / "metrics.csv"), "probe_acc")
    one = final_rows(read_csv(tmp_path / "one" / "metrics.csv"), "probe_acc")
    for a, b in zip(ddp, one):
        shots = [f"ncm_{k}shot_{stat}" for k in (1, 5) for stat in ("acc", "std")]
        for column in ("loss", "source_nc1", "target_cdnv", "probe_acc", "ncm_all_acc", *shots):
            # same global batches; float32 reductions in another order drift ~1e-6 relative, and
            # the probe's accuracy on 100 queries moves only if a prediction sits on a boundary
            assert a[column] == pytest.approx(b[column], rel=1e-3, abs=1e-6), column


def test_bad_draws_and_shots_fail_before_training(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[str] = []
    monkeypatch.setattr(transfer.Experiment, "run", lambda self, *a, **k: trained.append("run"))
    with pytest.raises(SystemExit):  # an argparse error naming the flag
        transfer.main([*TINY, "--draws", "0", "--cache-dir", cache, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="`shots` to be at most"):
        transfer.main(
            [*TINY, "--shots", "1", "100000", "--cache-dir", cache, "--out", str(tmp_path)]
        )
    assert not trained
    assert not any(tmp_path.iterdir())  # nothing written before the checks passed


def test_correlations_are_undefined_only_for_a_constant_or_too_few_points() -> None:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n = int(torch.randint(9, 15, (), generator=g))  # > 8 points: the Monte Carlo test
    x, y = torch.randn(n, generator=g).tolist(), torch.randn(n, generator=g).tolist()
    finals = [{"run": f"r{i}", "seed": i % 3, "a": a, "b": b} for i, (a, b) in enumerate(zip(x, y))]
    corr = correlations(finals, "a", "b", permutations=200)
    assert not math.isnan(corr.rho)
    assert corr.points == n
    # a real error is raised, not reported as "undefined (a constant)"
    with pytest.raises(ValueError, match="num_permutations"):
        correlations(finals, "a", "b", permutations=0)
    constant = [{**row, "b": 0.5} for row in finals]
    undefined = correlations(constant, "a", "b", permutations=200)
    assert math.isnan(undefined.rho)
    assert undefined.describe() == "undefined (a constant column)"
    few = correlations(finals[:2], "a", "b", permutations=200)
    assert few.describe() == "undefined (only 2 points)"
    # a NaN value (a diverged run) leaves its point out
    holes = [{**row, "a": math.nan} if i == 0 else row for i, row in enumerate(finals)]
    assert correlations(holes, "a", "b", permutations=200).points == n - 1
