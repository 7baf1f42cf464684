"""The layers recipe: a tiny run tracks every block, and the depth analysis fits what it should."""

from __future__ import annotations

import json
import math
from pathlib import Path

import layers
import pytest
from harness.data import write_random_cifar10
from harness.models import build_model
from harness.outputs import read_csv

TINY = [
    "--train-samples", "256", "--test-samples", "128", "--batch-size", "64",
    "--epochs", "2", "--eval-every", "1", "--seeds", "0", "--no-progress",
]  # fmt: skip


def test_tracked_layers_are_every_block_then_the_neck() -> None:
    cnn = build_model("cnn", (1, 40), 10)
    assert layers.tracked_layers(cnn) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "neck"]
    resnet = build_model("resnet18", (3, 32, 32), 10, width=4)
    names = layers.tracked_layers(resnet)
    assert names[0] == "blocks.stem"
    assert names[-1] == "neck"
    assert len(names) == 10  # stem, eight basic blocks, neck


def test_tiny_run_tracks_each_layer_on_train_and_test(tmp_path: Path) -> None:
    report = layers.main([*TINY, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "config.json").read_text())["runs"] == ["linear", "etf"]
    rows = read_csv(tmp_path / "metrics.csv")
    assert sorted((r["run"], r["epoch"]) for r in rows) == [
        ("etf", 1),
        ("etf", 2),
        ("linear", 1),
        ("linear", 2),
    ]
    tracked = ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "neck"]
    for row in rows:
        for layer in tracked:
            for split in ("train", "test"):
                assert math.isfinite(row[f"{split}_nc1@{layer}"])
                assert row[f"{split}_nc1@{layer}"] > 0
        # the neck's output is what a linear head reads: the tracker and the main metric agree
        if row["run"] == "linear":
            assert row["train_nc1@neck"] == pytest.approx(row["train_nc1"], rel=1e-6)
    for png in ("nc1_heatmap.png", "nc1_depth.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    text = report.read_text()
    for layer in tracked:
        assert f"| {layer} |" in text
    assert "geometric fit over the layers gives a factor" in text
    assert "| head input |" in text


def test_geometric_fit_recovers_the_ratio() -> None:
    ratio, r2 = layers.fit_geometric_decay([2.0 * 0.5**k for k in range(6)])
    assert ratio == pytest.approx(0.5)
    assert r2 == pytest.approx(1.0)
    ratio, r2 = layers.fit_geometric_decay([1.0, 0.1, 1.0, 0.1])
    assert r2 < 0.5


def test_resnet18_on_a_cifar_folder_tracks_its_ten_stages(tmp_path: Path) -> None:
    write_random_cifar10(tmp_path / "data", 80, 16)
    args = [
        "--dataset", "cifar10", "--model", "resnet18", "--width", "4", "--feature-dim", "16",
        "--data-root", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "40",
        "--seeds", "0", "--runs", "etf", "--no-progress", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    layers.main(args)
    (row,) = read_csv(tmp_path / "run" / "metrics.csv")
    names = layers.tracked_layers(build_model("resnet18", (3, 32, 32), 10, width=4))
    for name in names:
        assert math.isfinite(row[f"train_nc1@{name}"])
    assert row["train_images_per_s"] > 0
