"""The recipe harness: typed config, data (MNIST-1D cache, CIFAR reader, sampler), models."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pickle
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from harness.config import TrainConfig, arg, check_choices, load_config, parse_config, save_config
from harness.data import (
    ShardedBatchSampler,
    augment_cifar,
    load_cifar,
    load_mnist1d,
    write_random_cifar10,
)
from harness.models import build_model, head_features
from torch import Tensor, nn

from tests._helpers.ddp import run_distributed


@dataclasses.dataclass
class _Config(TrainConfig):
    study: ClassVar[str] = "unit"
    extra: float = arg(1.5, "A recipe-specific knob.")


# ----------------------------------------------------------------------------------------- config


def test_config_precedence_defaults_preset_file_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default out folder is created under ./runs
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


def test_config_file_of_an_earlier_run_never_takes_over_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # config.json of a run stores its `out` (and `resume`); starting a new run from it must not
    # write into (and wipe the checkpoints of) the old folder, nor continue its checkpoints.
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old"
    for resume in (False, True):
        save_config(_Config(epochs=3, extra=2.5, out=str(old), resume=resume), old / "config.json")
        config = parse_config(_Config, ["--config", str(old / "config.json"), "--lr", "0.1"])
        assert (config.epochs, config.extra, config.lr) == (3, 2.5, 0.1)  # settings carried over
        assert config.resume is False
        assert config.out is not None
        assert Path(config.out).parent == Path("runs/unit")  # a fresh folder of its own
        given = parse_config(_Config, ["--config", str(old / "config.json"), "--out", "new"])
        assert (given.out, given.resume) == ("new", False)


def test_resume_accepts_a_new_data_location(tmp_path: Path) -> None:
    # Where the data lies does not change what is trained: a resumed run may read it elsewhere.
    save_config(
        _Config(epochs=3, data_root="old", cache_dir="old-cache", out=str(tmp_path)),
        tmp_path / "config.json",
    )
    resumed = parse_config(
        _Config,
        ["--resume", "--out", str(tmp_path), "--data-root", "new", "--cache-dir", "new-cache"],
    )
    assert (resumed.data_root, resumed.cache_dir, resumed.epochs) == ("new", "new-cache", 3)
    kept = parse_config(_Config, ["--resume", "--out", str(tmp_path)])
    assert (kept.data_root, kept.cache_dir) == ("old", "old-cache")


def test_resume_without_out_picks_the_newest_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runs/unit"):
        parse_config(_Config, ["--resume"])
    for stamp, epochs in (("20250101-000000", 3), ("20250102-000000", 4)):
        save_config(
            _Config(epochs=epochs, out=f"runs/unit/{stamp}"), f"runs/unit/{stamp}/config.json"
        )
    resumed = parse_config(_Config, ["--resume"])
    assert resumed.out == str(Path("runs/unit/20250102-000000"))
    assert resumed.epochs == 4


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


def test_cifar_reader_and_missing_folder_error(tmp_path: Path) -> None:
    folder = write_random_cifar10(tmp_path, 20, 4)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)]:  # read back with plain pickle
        with (folder / name).open("rb") as handle:
            batch = pickle.load(handle)
        images.append(batch["data"])
        labels.extend(batch["labels"])
    data = load_cifar("cifar10", tmp_path)
    assert data.train.inputs.shape == (20, 3, 32, 32)
    assert data.train.inputs.dtype == torch.uint8
    assert np.array_equal(data.train.inputs.numpy().reshape(20, -1), np.concatenate(images))
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


def _augmented_epoch(data: object, rank: int, world_size: int) -> list[Tensor]:
    """The augmented inputs each step of one epoch feeds this rank (``train_one_epoch``)."""
    from harness.data import Dataset
    from harness.train import Objective, Runtime, train_one_epoch

    assert isinstance(data, Dataset)
    seen: list[Tensor] = []
    preprocess = data.preprocess

    def spy(inputs: Tensor, **kwargs: object) -> Tensor:
        out = preprocess(inputs, **kwargs)  # type: ignore[arg-type]
        seen.append(out.detach().clone())
        return out

    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x.flatten(1), self.linear(x.flatten(1))

    module = Module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    sampler = ShardedBatchSampler(data.train.targets, 8, seed=3, rank=rank, world_size=world_size)
    sampler.set_epoch(2)
    data.preprocess = spy  # type: ignore[method-assign]
    try:
        train_one_epoch(
            module, Objective(), optimizer, scheduler, scaler, data, sampler,
            Runtime(rank, world_size), None, seed=3, epoch=2,
        )  # fmt: skip
    finally:
        data.preprocess = preprocess  # type: ignore[method-assign]
    return seen


def test_cifar_augmentation_does_not_depend_on_the_number_of_processes(tmp_path: Path) -> None:
    # Each image of a global batch gets the same crop and flip whether one process or several
    # train on it (the docs promise the same global batches for 1 and N processes).
    write_random_cifar10(tmp_path, 21, 2, seed=int(torch.randint(0, 2**31, ())))
    data = load_cifar("cifar10", tmp_path)
    one = _augmented_epoch(data, 0, 1)
    ranks = [_augmented_epoch(data, r, 2) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 3  # global batches of 8, 8 and 5
    for step, whole in enumerate(one):
        for r in range(2):
            assert torch.equal(ranks[r][step], whole[r::2])


def test_augment_cifar_draws_for_the_global_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=generator)
    seed = int(torch.randint(0, 2**31, ()))
    whole = augment_cifar(
        images, "cifar10", train=True, generator=torch.Generator().manual_seed(seed)
    )
    for rank in range(3):
        positions = torch.arange(7)[rank::3]
        part = augment_cifar(
            images[positions], "cifar10", train=True,
            generator=torch.Generator().manual_seed(seed), positions=positions, batch_size=7,
        )  # fmt: skip
        assert torch.equal(part, whole[positions])


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
        normalize_features = True

    model = build_model("cnn", (1, 40), 5, head=lambda d, k: Normalising(d, k, bias=False)).eval()
    features = model.forward_features(torch.randn(3, 1, 40))
    pre = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pre, features / features.norm(dim=1, keepdim=True))
    assert torch.equal(head_features(nn.Linear(2, 2), features), features)
    no_bn = build_model("mlp", (1, 40), 5, neck_batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.neck.modules())


# ------------------------------------------------------------------------------------ train loop


def _gathered_bn_rank(rank: int, world_size: int, x: Tensor, split: int) -> dict[str, Tensor]:
    from harness.train import GatheredBatchNorm

    bn = GatheredBatchNorm(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    rows = slice(0, split) if rank == 0 else slice(split, None)
    local = x[rows].clone().requires_grad_(True)
    out = bn(local)
    (out * torch.arange(1.0, 4.0).view(1, 3, 1)).pow(2).sum().backward()
    assert bn.weight.grad is not None
    return {
        "out": out.detach(),
        "grad": local.grad,
        "weight_grad": bn.weight.grad,
        "mean": bn.running_mean,
        "var": bn.running_var,
    }


@pytest.mark.ddp
def test_gathered_batchnorm_matches_batchnorm_on_the_global_batch() -> None:
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0))
    ranks = run_distributed(_gathered_bn_rank, 2, x, 5)  # ragged: 5 rows and 3 rows
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    whole = x.clone().requires_grad_(True)
    out = bn(whole)
    (out * torch.arange(1.0, 4.0).view(1, 3, 1)).pow(2).sum().backward()
    # float32 reductions in a different order: agreement to a few ulps of the values involved
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), whole.grad)
    # DDP averages parameter gradients; the loss of each rank covers its rows, so the sum matches
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], bn.weight.grad)
    for r in ranks:
        torch.testing.assert_close(r["mean"], bn.running_mean)
        torch.testing.assert_close(r["var"], bn.running_var)


def test_schedules_and_optimisers() -> None:
    from harness.train import build_optimizer, build_scheduler

    model = nn.Linear(2, 2)
    for schedule, expected in (
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        ("step", lambda p: 0.1 ** ((p >= 0.5) + (p >= 0.75))),
        ("constant", lambda p: 1.0),
    ):
        config = _Config(epochs=4, lr=0.2, schedule=schedule, warmup_epochs=1)
        optimizer = build_optimizer(model, config, weight_decay=1e-3)
        assert isinstance(optimizer, torch.optim.SGD)
        assert optimizer.param_groups[0]["weight_decay"] == 1e-3
        scheduler = build_scheduler(optimizer, config, steps_per_epoch=10)
        lrs = []
        for _ in range(40):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs[:10] == pytest.approx([0.2 * (s + 1) / 10 for s in range(10)])  # warm-up
        assert lrs[10:] == pytest.approx([0.2 * expected((s - 10) / 30) for s in range(10, 40)])
    adamw = build_optimizer(model, _Config(optimizer="adamw"), weight_decay=0.0)
    assert isinstance(adamw, torch.optim.AdamW)


# --------------------------------------------------------------------------------------- outputs


def test_stats_tables_csv_and_plots(tmp_path: Path) -> None:
    from harness.outputs import Panel, Stat, markdown_table, plot_panels, read_csv, summarize

    values = [0.25, 0.5, 1.5]
    stat = Stat.of(values)
    assert stat.mean == pytest.approx(np.mean(values))
    assert stat.std == pytest.approx(np.std(values, ddof=1))
    assert Stat.of([2.0]).std == 0.0
    assert Stat(1.0, 0.1, 2).separated_from(Stat(1.3, 0.1, 2))
    assert not Stat(1.0, 0.2, 2).separated_from(Stat(1.3, 0.2, 2))
    rows = [
        {"run": run, "seed": seed, "epoch": epoch, "test_acc": 0.5 + 0.1 * seed + 0.01 * epoch}
        for run in ("a", "b")
        for seed in (0, 1)
        for epoch in (1, 2)
    ]
    rows.append({"run": "a", "seed": 0, "epoch": 3, "loss": 1.0})  # not evaluated: ignored
    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["run", "seed", "epoch", "test_acc", "loss"])
        writer.writeheader()
        writer.writerows(rows)
    assert read_csv(path) == rows
    summary = summarize(read_csv(path), ["test_acc"])
    assert list(summary) == ["a", "b"]
    assert summary["a"]["test_acc"].mean == pytest.approx(0.57)  # epoch 2 of seeds 0 and 1
    assert summary["a"]["test_acc"].std == pytest.approx(np.std([0.52, 0.62], ddof=1))
    table = markdown_table(summary, {"test_acc": "test acc"}, {"a": "run A"})
    assert table.splitlines()[2] == "| run A | 2 | 0.57 ± 0.0707 |"
    png = plot_panels(rows, [Panel("acc", {"test_acc": ""}, log=True)], tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ evaluation


def test_evaluate_against_brute_force_references() -> None:
    from harness.data import Dataset, Split
    from harness.evaluate import evaluate
    from harness.train import Runtime

    from torchcollapse.functional import neural_collapse

    generator = torch.Generator().manual_seed(0)
    num_classes = 3

    def split(n: int) -> Split:
        target = torch.arange(n) % num_classes
        return Split(torch.randn(n, 1, 40, generator=generator) + target.view(n, 1, 1), target)

    data = Dataset("mnist1d", split(60), split(30), num_classes)
    torch.manual_seed(0)
    model = build_model("cnn", (1, 40), num_classes, width=4, feature_dim=5).eval()
    row = evaluate(model, data, Runtime(), batch_size=16)  # several chunks per split
    with torch.no_grad():
        train_h = model.forward_features(data.train.inputs).double()
        test_h = model.forward_features(data.test.inputs).double()
    means = torch.stack([train_h[data.train.targets == c].mean(0) for c in range(num_classes)])
    weight, bias = model.head.weight.detach().double(), model.head.bias.detach().double()
    for name, h, target in (
        ("train", train_h, data.train.targets),
        ("test", test_h, data.test.targets),
    ):
        logits = h @ weight.T + bias
        nearest = torch.tensor(
            [min(range(num_classes), key=lambda c: float((x - means[c]).norm())) for x in h]
        )
        assert row[f"{name}_acc"] == pytest.approx(
            float((logits.argmax(1) == target).double().mean())
        )
        assert row[f"{name}_ncc_acc"] == pytest.approx(float((nearest == target).double().mean()))
        assert row[f"{name}_nc4"] == pytest.approx(
            float((nearest != logits.argmax(1)).double().mean())
        )
        reference = neural_collapse(h, target, num_classes=num_classes, weight=weight)
        # float32 features through float64 statistics: agreement to float32 rounding
        assert row[f"{name}_nc1"] == pytest.approx(float(reference["nc1"]), rel=1e-5)
        assert row[f"{name}_nc3"] == pytest.approx(float(reference["nc3"]), rel=1e-5)


def test_check_choices_names_the_argument_and_the_allowed_values() -> None:
    check_choices("runs", ("a", "b"), ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"`runs` to be among \['a', 'b'\], but got \['a', 'x'\]"):
        check_choices("runs", ("a", "x"), ("a", "b"))
    with pytest.raises(ValueError, match=r"`methods` to be among \['a'\], but got \[\]"):
        check_choices("methods", (), ("a",))


def test_runtime_device_cuda_takes_this_process_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # `--device cuda` must name an index for torch.cuda.set_device (LOCAL_RANK under torchrun);
    # without a GPU it is a clear error, not a CUDA traceback.
    from harness.train import Runtime

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no GPU"):
        Runtime.from_environment("cuda")
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    runtime = Runtime.from_environment("cuda")
    assert runtime.device == torch.device("cuda:1")
    assert chosen == [torch.device("cuda:1")]


def test_config_rejects_repeated_seeds_and_resume_without_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_config(_Config, ["--seeds", "0", "0", "--out", str(tmp_path)])
    assert "distinct `--seeds`" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="to name a run folder"):
        parse_config(_Config, ["--resume", "--out", str(tmp_path)])


# ------------------------------------------------------------------------------------ checkpoints


def _tiny_experiment_config(out: Path, cache: Path, **changes: object) -> _Config:
    values: dict[str, object] = dict(
        model="mlp", width=16, feature_dim=8, train_samples=64, test_samples=32, batch_size=32,
        epochs=1, seeds=(0,), progress=False, cache_dir=str(cache), out=str(out),
    )  # fmt: skip
    return _Config(**{**values, **changes})  # type: ignore[arg-type]


def _tiny_run(experiment: object, seed: int = 0) -> list[dict[str, object]]:
    from harness.train import Experiment, Objective

    assert isinstance(experiment, Experiment)
    data = experiment.data

    def build() -> tuple[nn.Module, Objective]:
        model = experiment.config.build_model(data.input_shape, data.num_classes)
        return model, Objective()

    _, history = experiment.run("tiny", seed, build, evaluate=lambda model: {})  # type: ignore[arg-type]
    return history


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_resume_reads_the_checkpoint_whatever_the_training_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A GPU run's checkpoint read back with map_location=<the GPU> put the saved CPU random state
    # on the GPU, which torch.set_rng_state refuses. Resuming a finished run with the model on
    # the meta device (nothing is computed; the data stays on the CPU for the sampler) stands in
    # for a device other than the CPU.
    from harness.data import Dataset
    from harness.train import Experiment

    out, cache = tmp_path / "run", tmp_path / "cache"
    with Experiment(_tiny_experiment_config(out, cache)) as experiment:
        history = _tiny_run(experiment)
    expected_state = torch.get_rng_state()
    torch.manual_seed(12345)
    config = _tiny_experiment_config(out, cache, resume=True, device="meta")
    monkeypatch.setattr(Dataset, "to", lambda self, device: self)
    with Experiment(config) as experiment:
        resumed = _tiny_run(experiment)
    assert [row["epoch"] for row in resumed] == [row["epoch"] for row in history] == [1]
    assert torch.equal(torch.get_rng_state(), expected_state)  # the saved state, restored


def test_reports_give_the_training_throughput(tmp_path: Path) -> None:
    """Every report ends with the training rate (images per second: the median over the timed
    epochs, numpy's median as the reference) and the seconds spent training and evaluating (the
    sums of the rows); rows without timings (e.g. a probe's) are left out, times that were not
    recorded (None) count as none, and no section is written without any."""
    from harness.outputs import throughput, write_report

    g = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    count = int(g.integers(2, 9))
    rates, train, evals = (
        g.uniform(100, 5000, count),
        g.uniform(0.1, 3, count),
        g.uniform(0, 1, count),
    )
    rows: list[dict[str, object]] = [
        {"run": "a", "epoch": i, "train_images_per_s": r, "train_time": t}
        for i, (r, t) in enumerate(zip(rates, train))
    ]
    for row, seconds in zip(rows[::2], evals[::2]):
        row["eval_time"] = seconds
    probe = {"run": "probe", "probe_acc": 0.5}  # not a training row
    rows.append(probe)
    # a timed epoch whose times were not recorded counts in the rate, with no seconds
    rates = np.append(rates, g.uniform(100, 5000))
    rows.append(
        {"run": "b", "train_images_per_s": rates[-1], "train_time": None, "eval_time": None}
    )
    count += 1
    text = throughput(rows)
    assert text is not None
    assert f"{np.median(rates):,.0f} images/s (median over {count} epochs" in text
    assert f"{train.sum():.1f} s of training and {evals[::2].sum():.1f} s of evaluation" in text
    report = write_report(tmp_path / "report.md", "T", [("Results", "x")], rows=rows).read_text()
    assert "## Throughput" in report
    assert text in report
    bare = write_report(tmp_path / "bare.md", "T", [("Results", "x")], rows=[probe]).read_text()
    assert "Throughput" not in bare
    assert throughput([]) is None


# ------------------------------------------------------------------ validation, folders, resume


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--momentum", "-0.5"], "--momentum"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--seeds", "-1"], "--seeds"),
        (["--seeds", "1", "1"], "--seeds"),
        (["--threads", "0"], "--threads"),
        (["--epochs", "0"], "--epochs"),
        (["--warmup-epochs", "-3"], "--warmup-epochs"),
        (["--device", "tpu"], "--device"),
        (["--dataset", "cifar10"], "--model"),
    ],
)
def test_values_out_of_range_are_argparse_errors_naming_the_flag(
    argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(_Config, [*argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2  # argparse's status, not a traceback
    error = capsys.readouterr().err
    assert f"`{flag}`" in error, error
    assert not (tmp_path / "run").exists()


def test_help_states_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(_Config, ["--help"])
    text = capsys.readouterr().out
    entries: dict[str, str] = {}
    for chunk in re.split(r"\n  (?=--)", text):
        flag = re.match(r"--[a-z-]+", chunk)
        if flag is not None:
            entries[flag.group(0)] = " ".join(chunk.split())
    for flag in ("--out", "--resume", "--width", "--feature-dim", "--threads", "--epochs"):
        assert entries[flag].count("(default") == 1, entries[flag]
    for flag, entry in entries.items():
        assert entry.count("(default") <= 1, (flag, entry)


def test_default_out_folders_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Launches in the same second (the stamp is frozen) each get a folder of their own, also
    # when they race; the newest is the one a later --resume picks.
    import harness.config

    monkeypatch.chdir(tmp_path)
    frozen = harness.config.datetime(2025, 1, 2, 3, 4, 5)

    class _Frozen(harness.config.datetime):
        @classmethod
        def now(cls, tz: object = None) -> harness.config.datetime:  # type: ignore[override]
            return frozen

    monkeypatch.setattr(harness.config, "datetime", _Frozen)
    count = int(torch.randint(3, 12, ()))
    outs: list[str] = []
    with ThreadPoolExecutor(max_workers=count) as pool:
        for config in pool.map(lambda _: parse_config(_Config, []), range(count)):
            assert config.out is not None
            outs.append(config.out)
    assert len(set(outs)) == count
    expected = {"20250102-030405"} | {f"20250102-030405-{i}" for i in range(2, count + 1)}
    assert {Path(o).name for o in outs} == expected
    assert all(Path(o).is_dir() and Path(o).parent == Path("runs/unit") for o in outs)
    for out in outs:  # every launch started: each writes its config.json
        save_config(_Config(out=out), Path(out) / "config.json")
    resumed = parse_config(_Config, ["--resume"])
    assert resumed.out == str(Path(f"runs/unit/20250102-030405-{count}"))  # -10 after -9


def test_config_sizes_left_unset_follow_the_chosen_model(tmp_path: Path) -> None:
    from harness.models import DEFAULT_SIZES

    file = tmp_path / "config.json"
    save_config(_Config(model="cnn", out=str(tmp_path)), file)
    assert json.loads(file.read_text())["width"] is None  # saved as unset, not as CNN's 32
    for argv, model, expected in (
        (["--model", "mlp"], "mlp", (256, 32)),
        (["--dataset", "cifar10", "--model", "resnet18"], "resnet18", (64, 512)),
        (["--model", "mlp", "--width", "16"], "mlp", (16, 32)),
    ):
        config = parse_config(_Config, ["--config", str(file), *argv, "--out", "o"])
        assert config.model == model
        assert (
            config.sizes
            == expected
            == (
                expected[0] if "--width" in argv else DEFAULT_SIZES[model][0],
                DEFAULT_SIZES[model][1],
            )
        )
    # a size the user set is kept with the saved config
    save_config(_Config(model="cnn", width=8, out=str(tmp_path)), file)
    config = parse_config(_Config, ["--config", str(file), "--model", "mlp", "--out", "o"])
    assert config.sizes == (8, 32)
    built = config.build_model((1, 40), 10)
    assert built.feature_dim == 32
    assert built.blocks[0][0].out_features == 8  # type: ignore[index]


def test_resume_and_config_refuse_another_recipes_folder(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class _Other(TrainConfig):
        study: ClassVar[str] = "other"

    save_config(_Other(epochs=3, out=str(tmp_path)), tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["study"] == "other"
    with pytest.raises(ValueError, match="written by the 'other' recipe"):
        parse_config(_Config, ["--resume", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="written by the 'other' recipe"):
        parse_config(_Config, ["--config", str(tmp_path / "config.json"), "--out", "o"])
    assert parse_config(_Other, ["--resume", "--out", str(tmp_path)]).epochs == 3


def test_a_launch_that_fails_before_training_writes_and_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.train import Experiment

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    # an earlier run, finished, in the default place, with its report and a plot
    first = parse_config(_Config, [])
    assert first.out is not None
    out = Path(first.out)
    with Experiment(_tiny_experiment_config(out, cache)) as experiment:
        _tiny_run(experiment)
    (out / "report.md").write_text("earlier report\n\n![curves](curves.png)\n")
    (out / "curves.png").write_bytes(b"png")
    (out / "figure.png").write_bytes(b"the user's own")  # not the run's: never deleted
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "checkpoints" / "tiny-seed0.pt" in before

    # a mistyped launch into the same folder: CIFAR without --data-root
    broken = _tiny_experiment_config(out, cache, dataset="cifar10", model="resnet18")
    with pytest.raises(FileNotFoundError, match="--data-root"):
        Experiment(broken)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # the same mistake with a default folder: the folder made for it is removed again...
    failed = parse_config(_Config, ["--dataset", "cifar10", "--model", "resnet18"])
    assert failed.out is not None
    assert Path(failed.out).is_dir()
    with pytest.raises(FileNotFoundError, match="--data-root"):
        Experiment(failed)
    assert not Path(failed.out).exists()
    # ... and --resume still finds the earlier run
    assert parse_config(_Config, ["--resume"]).out == str(out)
    # a recipe's own check failing inside the experiment leaves no folder either
    checked = parse_config(_Config, ["--cache-dir", str(cache)])
    with pytest.raises(ValueError, match="recipe check"), Experiment(checked):
        raise ValueError("recipe check")
    assert checked.out is not None
    assert not Path(checked.out).exists()

    # starting over for real clears every output of the earlier run, and nothing else
    with Experiment(_tiny_experiment_config(out, cache, epochs=2)) as experiment:
        experiment.start()
        assert not (out / "report.md").exists()
        assert not (out / "curves.png").exists()
        assert not (out / "metrics.csv").exists()
        assert not list((out / "checkpoints").glob("*.pt"))
        assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert (out / "figure.png").read_bytes() == b"the user's own"

    # a folder whose config.json is not a run of this recipe is refused, untouched
    for foreign in ("{}", '{"study": "another"}', "not json"):
        folder = tmp_path / f"user-{len(foreign)}"
        folder.mkdir()
        (folder / "config.json").write_text(foreign)
        (folder / "figure.png").write_bytes(b"png")
        files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        refused = pytest.raises(ValueError, match="to be empty or to hold a run of")
        with refused, Experiment(_tiny_experiment_config(folder, cache)) as experiment:
            experiment.start()
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


def _diverging_study(out: Path, cache: Path, **changes: object) -> list[dict[str, object]]:
    """Run ``explodes`` (cross-entropy at a huge learning rate) and ``frozen`` (the same loss
    times 0: no gradient, it cannot diverge) for two seeds, evaluated with the real metrics."""
    from harness.evaluate import evaluate
    from harness.train import Experiment, Objective, cross_entropy

    options = {"lr": 1e30, "epochs": 3, "seeds": (0, 1), "eval_every": 1, **changes}
    config = _tiny_experiment_config(out, cache, **options)

    def frozen_loss(logits: Tensor, features: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(logits, features, target) * 0.0

    with Experiment(config) as experiment:
        data = experiment.data
        for name, loss in (("explodes", cross_entropy), ("frozen", frozen_loss)):

            def build(loss: object = loss) -> tuple[nn.Module, Objective]:
                model = experiment.config.build_model(data.input_shape, data.num_classes)
                return model, Objective(sample_loss=loss)  # type: ignore[arg-type]

            for seed in config.seeds:
                experiment.run(
                    name,
                    seed,
                    build,  # type: ignore[arg-type]
                    evaluate=lambda model: evaluate(model, data, experiment.runtime),
                )
        return experiment.rows


@pytest.mark.parametrize("batch_size", [32, 64])
def test_a_diverged_run_is_recorded_and_the_study_goes_on(
    batch_size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch 32: two steps per epoch, the epoch's loss is not finite; batch 64: one step, the
    # loss (taken before the step) is finite and the evaluation finds non-finite features.
    import harness.train
    from harness.outputs import read_csv, summarize, write_report

    out, cache = tmp_path / "run", tmp_path / "cache"
    rows = _diverging_study(out, cache, batch_size=batch_size)
    for seed in (0, 1):
        exploded = [r for r in rows if r["run"] == "explodes" and r["seed"] == seed]
        assert exploded[-1].get("diverged") == 1
        assert all("diverged" not in r for r in exploded[:-1])
        assert "test_acc" not in exploded[-1]  # no metrics of a diverged model
        assert len(exploded) < 3  # training stopped where it diverged
        if batch_size == 64:
            assert math.isfinite(float(exploded[-1]["loss"]))  # type: ignore[arg-type]
        kept = [r for r in rows if r["run"] == "frozen" and r["seed"] == seed]
        assert [r["epoch"] for r in kept] == [1, 2, 3]
        assert all(math.isfinite(float(r["test_nc1"])) for r in kept)  # type: ignore[arg-type]
    csv_rows = read_csv(out / "metrics.csv")
    assert [r.get("diverged") for r in csv_rows] == [r.get("diverged") for r in rows]
    summary = summarize(csv_rows, ["test_acc", "train_nc1"])
    assert math.isnan(summary["explodes"]["test_acc"].mean)  # not an epoch before it diverged
    assert summary["explodes"]["test_acc"].n == 2
    assert math.isfinite(summary["frozen"]["test_acc"].mean)
    report = write_report(out / "report.md", "T", [("Results", "x")], rows=csv_rows).read_text()
    assert "## Diverged runs" in report
    for row in csv_rows:
        if row.get("diverged"):
            assert f"`explodes`, seed {row['seed']}: diverged at epoch {row['epoch']}" in report

    # --resume keeps the diverged runs as they are and trains nothing
    written = (out / "metrics.csv").read_text()
    monkeypatch.setattr(harness.train, "train_one_epoch", lambda *a, **k: pytest.fail("trained"))
    resumed = _diverging_study(out, cache, batch_size=batch_size, resume=True)
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in rows]
    assert (out / "metrics.csv").read_text() == written


def test_a_corrupt_cifar_file_is_named_in_the_error(tmp_path: Path) -> None:
    folder = write_random_cifar10(tmp_path, 50, 20)
    assert load_cifar("cifar10", tmp_path).train.inputs.shape == (50, 3, 32, 32)
    batch = folder / f"data_batch_{int(torch.randint(1, 6, ()))}"
    data = batch.read_bytes()
    batch.write_bytes(data[: int(torch.randint(1, len(data) - 1, ()))])  # truncated
    with pytest.raises(ValueError, match=re.escape(f"Expected {batch} to be a valid CIFAR")):
        load_cifar("cifar10", tmp_path)
    batch.write_bytes(pickle.dumps([1, 2, 3]))  # a pickle, but not a CIFAR batch
    with pytest.raises(ValueError, match="holds no dict with 'data' and 'labels'"):
        load_cifar("cifar10", tmp_path)


_RECIPE_ARGS = {
    "generalization": ["--runs", "linear", "etf"],
    "transfer": ["--runs", "ce", "etf", "--shots", "1", "--draws", "2", "--permutations", "10"],
    "imbalance": ["--methods", "linear_ce", "etf_ce", "--ratios", "10"],
    "layers": ["--runs", "linear", "etf"],
}


@pytest.mark.parametrize("recipe", sorted(_RECIPE_ARGS))
def test_every_recipe_reports_a_diverged_run_and_resumes(
    recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A huge learning rate: the linear head's run diverges in its first epoch; the study still
    # ends with a report that names it, and --resume of that study works.
    import importlib

    from harness.outputs import read_csv

    module = importlib.import_module(recipe)
    out = tmp_path / "run"
    args = [
        "--train-samples", "400", "--test-samples", "100", "--batch-size", "64", "--width", "8",
        "--epochs", "2", "--eval-every", "1", "--seeds", "0", "--no-progress", "--lr", "1e30",
        "--cache-dir", str(tmp_path / "cache"), *_RECIPE_ARGS[recipe],
    ]  # fmt: skip
    report = module.main([*args, "--out", str(out)])
    rows = read_csv(out / "metrics.csv")
    diverged = [r for r in rows if r.get("diverged")]
    assert diverged
    assert any(str(r["run"]).startswith(("linear", "ce")) for r in diverged)
    text = report.read_text()
    assert "## Diverged runs" in text
    for row in diverged:
        assert f"`{row['run']}`, seed 0: diverged at epoch {row['epoch']}" in text
    assert "diverged at epoch" in capsys.readouterr().err
    # the findings leave the diverged runs out, and say so: no comparison of NaN means
    findings = text.split("## Findings", 1)[1].split("\n## ", 1)[0]
    note, rest = findings.split("(a seed diverged; see Diverged runs).", 1)
    named = set(note.split("Left out of the findings below:", 1)[1].strip().split(", "))
    assert named == {str(row["run"]) for row in diverged}
    assert "nan" not in rest.lower()
    module.main(["--resume", "--out", str(out), "--no-progress"])
    assert (out / "metrics.csv").read_text().count("\n") == len(rows) + 1


@pytest.mark.parametrize(
    ("recipe", "argv", "flag"),
    [
        ("generalization", ["--etf-scale", "-1"], "--etf-scale"),
        ("generalization", ["--decay", "-1"], "--decay"),
        ("generalization", ["--reg-nc1", "nan"], "--reg-nc1"),
        ("generalization", ["--reg-nc1", "0", "--reg-nc3", "0"], "--reg-nc1"),
        ("generalization", ["--runs", "foo"], "--runs"),
        ("layers", ["--etf-scale", "0"], "--etf-scale"),
        ("imbalance", ["--etf-scale", "inf"], "--etf-scale"),
        ("imbalance", ["--minority-fraction", "1.5"], "--minority-fraction"),
        ("imbalance", ["--ratios", "inf"], "--ratios"),
        ("imbalance", ["--max-count", "0"], "--max-count"),
        ("transfer", ["--target-nc1", "2"], "--target-nc1"),
        ("transfer", ["--permutations", "0"], "--permutations"),
        ("transfer", ["--probe-weight-decay", "-1"], "--probe-weight-decay"),
        ("transfer", ["--etf-scale", "0"], "--etf-scale"),
        ("transfer", ["--label-smoothing", "nan"], "--label-smoothing"),
        ("transfer", ["--reg-weight", "inf"], "--reg-weight"),
    ],
)
def test_recipe_values_are_checked_before_anything_runs(
    recipe: str,
    argv: list[str],
    flag: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    import harness.train

    module = importlib.import_module(recipe)
    monkeypatch.setattr(harness.train.Experiment, "__init__", lambda *a: pytest.fail("started"))
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert f"`{flag}`" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
