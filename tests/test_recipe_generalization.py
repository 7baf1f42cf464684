"""The generalization recipe: tiny runs write readable outputs, resume, and match under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import generalization
import harness.train
import numpy as np
import pytest
from generalization import RUNS, findings, spearman
from harness.outputs import Stat, read_csv

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--train-samples", "256", "--test-samples", "128", "--batch-size", "64",
    "--epochs", "2", "--eval-every", "1", "--seeds", "0", "--no-progress",
]  # fmt: skip
EVALUATED = ["train_acc", "test_acc", "test_ncc_acc", "train_nc1", "test_nc1", "test_nc4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("mnist1d-cache"))


def _key(row: dict[str, object]) -> tuple[object, object, object]:
    return row["run"], row["seed"], row["epoch"]


def test_tiny_run_writes_config_csv_plots_and_report(tmp_path: Path, cache: str) -> None:
    report = generalization.main([*TINY, "--cache-dir", cache, "--out", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["epochs"] == 2
    assert config["runs"] == list(RUNS)
    rows = read_csv(tmp_path / "metrics.csv")
    assert sorted(_key(r) for r in rows) == sorted(
        (run, 0, epoch) for run in RUNS for epoch in (1, 2)
    )
    for row in rows:
        for column in EVALUATED:
            assert math.isfinite(row[column]), (column, row)
        assert 0.0 <= row["test_acc"] <= 1.0
        assert row["train_nc1"] > 0
    for png in ("nc1.png", "accuracy.png", "geometry.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    text = report.read_text()
    assert report == tmp_path / "report.md"
    for label in RUNS.values():
        assert f"| {label} | 1 |" in text
    assert "![nc1](nc1.png)" in text
    assert "**Train NC1.**" in text


def test_resume_after_a_killed_run_continues_without_gap_or_duplicate(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*TINY, "--epochs", "3", "--runs", "linear", "etf_reg", "--cache-dir", cache]
    generalization.main([*args, "--out", str(tmp_path / "whole")])
    whole = read_csv(tmp_path / "whole" / "metrics.csv")

    real = harness.train.train_one_epoch
    calls = {"n": 0}

    def dies_in_epoch_2_of_second_run(*a: object, **k: object) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 5:  # epochs 1-3 of `linear`, epoch 1 of `etf_reg`, then killed
            raise KeyboardInterrupt
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(harness.train, "train_one_epoch", dies_in_epoch_2_of_second_run)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        generalization.main([*args, "--out", str(out)])
    before = read_csv(out / "metrics.csv")
    assert [_key(r) for r in before] == [("linear", 0, e) for e in (1, 2, 3)] + [("etf_reg", 0, 1)]
    monkeypatch.setattr(harness.train, "train_one_epoch", real)

    generalization.main(["--resume", "--out", str(out), "--no-progress"])
    after = read_csv(out / "metrics.csv")
    assert [_key(r) for r in after] == [_key(r) for r in whole]  # no gap, no duplicate
    for resumed, reference in zip(after, whole):
        for column, value in reference.items():
            if column.endswith(("_time", "_per_s")):
                continue
            if isinstance(value, str):
                assert resumed[column] == value
                continue
            # same batches, same state, same single-threaded kernels: identical numbers
            assert resumed[column] == pytest.approx(value, rel=1e-12, abs=0), column


@pytest.mark.ddp
def test_torchrun_two_processes_match_one_process(tmp_path: Path, cache: str) -> None:
    args = [*TINY, "--runs", "linear", "etf_reg", "--cache-dir", cache]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the script puts recipes/ on its own path
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "recipes" / "generalization.py"), *args, "--out", str(tmp_path / "ddp"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    generalization.main([*args, "--out", str(tmp_path / "one")])
    ddp = read_csv(tmp_path / "ddp" / "metrics.csv")
    one = read_csv(tmp_path / "one" / "metrics.csv")
    assert [_key(r) for r in ddp] == [_key(r) for r in one]
    for a, b in zip(ddp, one):
        for column in ["loss", *EVALUATED, "train_nc3", "test_nc2_etf_distance"]:
            # the same global batches; float32 sums in another order drift by ~1e-6 relative over
            # two epochs of training, and accuracies (multiples of 1/128) must agree exactly
            assert a[column] == pytest.approx(b[column], rel=1e-4, abs=1e-6), column


def test_findings_follow_the_numbers() -> None:
    def summary(etf_nc1: float) -> dict[str, dict[str, Stat]]:
        base = {"train_acc": Stat(1.0, 0.0, 2), "test_nc1": Stat(0.5, 0.01, 2)}
        return {
            "linear": {**base, "train_nc1": Stat(0.7, 0.01, 2), "test_acc": Stat(0.96, 0.002, 2)},
            "linear_wd": {
                **base,
                "train_nc1": Stat(0.1, 0.01, 2),
                "test_acc": Stat(0.98, 0.002, 2),
            },
            "etf": {**base, "train_nc1": Stat(etf_nc1, 0.01, 2), "test_acc": Stat(0.97, 0.002, 2)},
            "etf_reg": {**base, "train_nc1": Stat(0.5, 0.01, 2), "test_acc": Stat(0.95, 0.01, 2)},
        }

    more = " ".join(findings(summary(0.02)))
    assert "The ETF heads collapse more" in more
    assert "(ETF head) ends at train NC1 0.02 ± 0.01 against 0.1 ± 0.01 for the most" in more
    assert "test NC1 does not follow the train collapse, test accuracy does not." in more
    assert "**Weight decay** lowers train NC1" in more
    assert "**The regularizer** raises train NC1" in more
    less = " ".join(findings(summary(0.3)))
    assert "The ETF heads collapse less" in less
    assert "the gap is more than the spread over seeds" in less


def test_spearman_against_ranks_by_argsort() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=6), rng.normal(size=6)
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        assert spearman(list(x), list(y)) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    )
    assert math.isnan(spearman([1.0, 2.0], [2.0, 1.0]))
