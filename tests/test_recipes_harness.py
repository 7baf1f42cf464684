"""The recipe harness: typed config, data (MNIST-1D cache, CIFAR reader, sampler), models."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from harness.config import TrainConfig, arg, load_config, parse_config, save_config
from harness.data import ShardedBatchSampler, augment_cifar, load_cifar, load_mnist1d
from harness.models import build_model, head_features
from torch import nn


@dataclasses.dataclass
class _Config(TrainConfig):
    study: ClassVar[str] = "unit"
    extra: float = arg(1.5, "A recipe-specific knob.")


# ----------------------------------------------------------------------------------------- config


def test_config_precedence_defaults_preset_file_flags(tmp_path: Path) -> None:
    presets = {"paper": {"epochs": 200, "seeds": [0, 1, 2], "extra": 2.0}}
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"extra": 3.0, "lr": 0.2}))
    config = parse_config(
        _Config,
        ["--preset", "paper", "--config", str(file), "--lr", "0.3", "--no-amp", "--out", "x"],
        presets=presets,
    )
    assert config.epochs == 200  # preset over default
    assert config.seeds == (0, 1, 2)  # JSON list back to a tuple
    assert config.extra == 3.0  # file over preset
    assert config.lr == 0.3  # flag over file
    assert config.amp is False
    assert config.batch_size == _Config().batch_size
    default = parse_config(_Config, [])
    assert default.out is not None
    assert Path(default.out).parent == Path("runs/unit")


def test_config_optional_tuple_and_literal_flags() -> None:
    config = parse_config(
        _Config,
        ["--train-samples", "64", "--seeds", "3", "4", "--optimizer", "adamw", "--out", "o"],
    )
    assert (config.train_samples, config.seeds, config.optimizer) == (64, (3, 4), "adamw")
    assert parse_config(_Config, ["--train-samples", "none", "--out", "o"]).train_samples is None
    with pytest.raises(SystemExit):
        parse_config(_Config, ["--optimizer", "rmsprop"])


def test_config_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ValueError, match="unknown"):
        parse_config(_Config, ["--config", str(file)])
    with pytest.raises(ValueError, match="`epochs` to be positive"):
        _Config(epochs=0)
    with pytest.raises(ValueError, match="`model` to be 'resnet18'"):
        _Config(dataset="cifar10")


def test_config_roundtrip_and_resume_reuses_saved(tmp_path: Path) -> None:
    config = parse_config(_Config, ["--epochs", "7", "--seeds", "5", "--out", str(tmp_path)])
    save_config(config, tmp_path / "config.json")
    assert load_config(_Config, tmp_path / "config.json") == config
    resumed = parse_config(_Config, ["--resume", "--out", str(tmp_path), "--no-progress"])
    assert resumed.epochs == 7
    assert resumed.seeds == (5,)
    assert resumed.resume
    assert resumed.progress is False  # run-time settings may change
    with pytest.raises(ValueError, match="epochs"):
        parse_config(_Config, ["--resume", "--out", str(tmp_path), "--epochs", "9"])


# ------------------------------------------------------------------------------------------- data


def test_mnist1d_generated_once_cached_and_global_rng_untouched(tmp_path: Path) -> None:
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002 - the global state is what must survive
    expected = (random.random(), np.random.rand())  # noqa: NPY002
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002 - the global state is what must survive
    data = load_mnist1d(tmp_path, num_samples=200)
    assert (random.random(), np.random.rand()) == expected  # noqa: NPY002
    (cached,) = tmp_path.glob("*.npz")
    stamp = cached.stat().st_mtime_ns
    again = load_mnist1d(tmp_path, num_samples=200)
    assert cached.stat().st_mtime_ns == stamp
    assert torch.equal(again.train.inputs, data.train.inputs)
    assert data.train.inputs.shape == (160, 1, 40)
    assert data.test.inputs.shape == (40, 1, 40)
    assert data.train.targets.dtype == torch.long
    assert set(data.train.targets.tolist()) <= set(range(10))
    assert not list(Path.cwd().glob("mnist1d_data*.pkl"))  # never the package's cwd pickle


def _write_fake_cifar10(root: Path, per_batch: int) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        target = rng.integers(0, 10, per_batch).tolist()
        with (folder / name).open("wb") as handle:
            pickle.dump({"data": data, "labels": target}, handle)
        images.append(data)
        labels.append(target)
    return np.concatenate(images[:5]), np.concatenate(labels[:5])


def test_cifar_reader_and_missing_folder_error(tmp_path: Path) -> None:
    images, labels = _write_fake_cifar10(tmp_path, per_batch=4)
    data = load_cifar("cifar10", tmp_path)
    assert data.train.inputs.shape == (20, 3, 32, 32)
    assert data.train.inputs.dtype == torch.uint8
    assert np.array_equal(data.train.inputs.numpy().reshape(20, -1), images)
    assert np.array_equal(data.train.targets.numpy(), labels)
    assert load_cifar("cifar10", tmp_path / "cifar-10-batches-py").test.targets.shape == (4,)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python\.tar\.gz"):
        load_cifar("cifar100", tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_cifar("cifar10", None)


def test_augment_cifar_crops_a_padded_window_and_flips() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    plain = augment_cifar(images, "cifar10", train=False)
    mean, std = (
        torch.tensor(v).view(1, 3, 1, 1)
        for v in ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    )
    torch.testing.assert_close(plain, (images / 255.0 - mean) / std)
    out = augment_cifar(images, "cifar10", train=True, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    for b in range(6):  # each output is some 32x32 window of the padded image, maybe mirrored
        windows = [padded[b, :, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(2)) for w in windows)


def test_sharded_sampler_ranks_partition_the_single_process_batches() -> None:
    targets = torch.arange(103) % 5
    single = ShardedBatchSampler(targets, 20, seed=3)
    ranks = [ShardedBatchSampler(targets, 20, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        batches = list(single)
        sharded = [list(s) for s in ranks]
        assert len(sharded[0]) == len(sharded[1]) == len(batches) == 5  # 3 leftover merged
        for step, batch in enumerate(batches):
            assert sorted(sharded[0][step] + sharded[1][step]) == sorted(batch)
        assert sorted(i for b in batches for i in b) == list(range(103))
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first  # a new permutation each epoch


def test_sharded_sampler_last_batch_rules() -> None:
    one_class_tail = torch.tensor([0, 1] * 10 + [2, 2, 2])  # natural order: tail holds one class
    merged = list(ShardedBatchSampler(one_class_tail, 10, shuffle=False, min_size=2))
    assert [len(b) for b in merged] == [10, 13]
    dropped = list(ShardedBatchSampler(one_class_tail, 10, shuffle=False, last_batch="drop"))
    assert [len(b) for b in dropped] == [10, 10]
    kept = list(ShardedBatchSampler(one_class_tail, 10, shuffle=False, last_batch="keep"))
    assert [len(b) for b in kept] == [10, 10, 3]
    two_class_tail = torch.tensor([0, 1] * 11 + [0])
    assert [len(b) for b in ShardedBatchSampler(two_class_tail, 10, shuffle=False, min_size=2)] == [
        10,
        10,
        3,
    ]
    assert [len(b) for b in ShardedBatchSampler(two_class_tail, 10, shuffle=False, min_size=4)] == [
        10,
        13,
    ]
    assert ShardedBatchSampler(two_class_tail, 10, min_size=2, world_size=2).min_size == 4
    with pytest.raises(ValueError, match="at least 2 per process"):
        ShardedBatchSampler(two_class_tail, 3, world_size=2)


# ----------------------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("name", "shape"), [("cnn", (1, 40)), ("mlp", (1, 40)), ("resnet18", (3, 32, 32))]
)
def test_models_split_features_and_head(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    options = {"width": 8} if name == "resnet18" else {}
    model = build_model(name, shape, 7, feature_dim=12, **options).eval()
    x = torch.randn(4, *shape)
    features = model.forward_features(x)
    assert features.shape == (4, 12)
    torch.testing.assert_close(model(x), model.get_classifier()(features))
    assert torch.equal(model.forward_head(features, pre_logits=True), features)
    assert isinstance(model.neck[-1], nn.BatchNorm1d)


def test_pre_logits_normalise_for_a_normalising_head() -> None:
    class Normalising(nn.Linear):
        normalize = True

    model = build_model("cnn", (1, 40), 5, head=lambda d, k: Normalising(d, k, bias=False)).eval()
    features = model.forward_features(torch.randn(3, 1, 40))
    pre = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pre, features / features.norm(dim=1, keepdim=True))
    assert torch.equal(head_features(nn.Linear(2, 2), features), features)
    no_bn = build_model("mlp", (1, 40), 5, neck_batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.neck.modules())
