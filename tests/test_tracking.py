"""CollapseTracker: per-layer metrics equal NeuralCollapse on features pooled by hand."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from tests._helpers.ddp import run_distributed
from tests._helpers.device_tensors import OnDevice
from torchcollapse.functional import neural_collapse
from torchcollapse.metrics import NeuralCollapse
from torchcollapse.tracking import CollapseTracker, _holds_float64, pool_features

NUM_CLASSES = 4


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),  # "0": (N, 6, 12) maps
        nn.ReLU(),
        nn.Conv1d(6, 5, 3, stride=2),  # "2": (N, 5, 5) maps
        nn.Flatten(),
        nn.Linear(25, 7),  # "4": (N, 7)
        nn.Linear(7, NUM_CLASSES),
    ).double()


def _data(n: int = 96, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, 2, 12, generator=generator, dtype=torch.float64)
    return x + target.view(n, 1, 1).double(), target


def _by_hand(model: nn.Sequential, x: Tensor) -> dict[str, Tensor]:
    """Each tracked layer's output, pooled with plain torch (mean over length), in float64."""
    out0 = model[0](x)
    out2 = model[2](model[1](out0))
    out4 = model[4](model[3](out2))
    return {"0": out0.mean(dim=2).detach(), "2": out2.mean(dim=2).detach(), "4": out4.detach()}


def _nc1_brute_force(features: Tensor, target: Tensor) -> float:
    """tr(Sigma_W Sigma_B^+) / K by loops over classes and samples (float64)."""
    classes = target.unique()
    means = torch.stack([features[target == c].mean(0) for c in classes])
    centred = means - means.mean(0)
    sigma_b = sum(torch.outer(m, m) for m in centred) / len(classes)
    sigma_w = sum(
        torch.outer(h - means[int(c)], h - means[int(c)]) for h, c in zip(features, target)
    ) / len(features)
    eigenvalues, vectors = torch.linalg.eigh(sigma_b)
    top = vectors[:, -(len(classes) - 1) :]
    pinv = top @ torch.diag(1 / eigenvalues[-(len(classes) - 1) :]) @ top.T
    return float(torch.trace(sigma_w @ pinv) / len(classes))


def test_tracker_equals_per_layer_metrics_on_hand_pooled_features() -> None:
    model = _model()
    x, y = _data()
    expected = {
        name: neural_collapse(h, y, num_classes=NUM_CLASSES)
        for name, h in _by_hand(model, x).items()
    }
    with CollapseTracker(model, ["0", "2", "4"], NUM_CLASSES) as tracker:
        for chunk in torch.arange(len(y)).split(40):  # streamed in ragged batches
            with torch.no_grad(), tracker.targets(y[chunk]):
                model(x[chunk])
        results = tracker.compute()
    assert list(results) == ["0", "2", "4"]
    for name, values in expected.items():
        for key, value in values.items():
            if key == "nc4":  # needs reference means the tracker's metrics were not given
                continue
            # float64 inputs, exact streaming: agreement to float64 rounding of the statistics
            torch.testing.assert_close(
                results[name][key].double().cpu(), value.double(), rtol=1e-9, atol=1e-12
            )
    pooled = _by_hand(model, x)["2"].detach()
    assert float(results["2"]["nc1"]) == pytest.approx(_nc1_brute_force(pooled, y), rel=1e-9)


def test_hooks_record_only_inside_targets_and_are_removed() -> None:
    model = _model()
    x, y = _data()
    tracker = CollapseTracker(model, ["0"], NUM_CLASSES)
    model(x)  # outside the context: nothing recorded
    with pytest.raises(RuntimeError, match="none did"):
        tracker.compute()
    out = tracker.update(x, y)  # runs under no_grad and returns the model's output
    assert not out.requires_grad
    torch.testing.assert_close(out, model(x).detach())
    first = tracker.compute()["0"]["nc1"]
    tracker.reset()
    tracker.update(x[:48], y[:48])
    tracker.update(x[48:], y[48:])
    assert float(tracker.compute()["0"]["nc1"]) == pytest.approx(float(first), rel=1e-12)
    assert tracker.num_hooks == 1
    tracker.remove()
    tracker.remove()  # twice is fine
    assert tracker.num_hooks == 0
    assert not model[0]._forward_hooks
    with pytest.raises(RuntimeError, match="removed"), tracker.targets(y):
        pass


def test_layer_selection_by_type_predicate_and_errors() -> None:
    model = _model()
    assert CollapseTracker(model, nn.Conv1d, NUM_CLASSES).layers == ["0", "2"]
    assert CollapseTracker(model, (nn.Linear, nn.Conv1d), NUM_CLASSES).layers == [
        "0",
        "2",
        "4",
        "5",
    ]
    chosen = CollapseTracker(model, lambda name, m: name in ("4", "5"), NUM_CLASSES)
    assert chosen.layers == ["4", "5"]
    assert CollapseTracker(model, "4", NUM_CLASSES).layers == ["4"]
    with pytest.raises(ValueError, match="name submodules"):
        CollapseTracker(model, ["0", "conv9"], NUM_CLASSES)
    with pytest.raises(ValueError, match="at least one layer"):
        CollapseTracker(model, nn.LSTM, NUM_CLASSES)
    with pytest.raises(TypeError, match="layer names"):
        CollapseTracker(model, [0], NUM_CLASSES)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="`layers`"):
        CollapseTracker(model, 3, NUM_CLASSES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_classes`"):
        CollapseTracker(model, ["0"], 1)
    with pytest.raises(ValueError, match="`pool`"):
        CollapseTracker(model, ["0"], NUM_CLASSES, pool="median")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`model`"):
        CollapseTracker("model", ["0"], NUM_CLASSES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most one"):
        CollapseTracker(
            model, ["0"], NUM_CLASSES, metric_factory=lambda n: NeuralCollapse(4), metric_kwargs={}
        )
    with pytest.raises(TypeError, match="`metric_factory` to return a torchmetrics Metric"):
        CollapseTracker(model, ["0"], NUM_CLASSES, metric_factory=lambda n: None)  # type: ignore[arg-type,return-value]
    assert not model[0]._forward_hooks  # refused before any hook was registered
    with (
        CollapseTracker(model, ["0"], NUM_CLASSES) as tracker,
        pytest.raises(ValueError, match="1-D"),
    ):
        tracker.update(torch.zeros(2, 2, 12, dtype=torch.float64), torch.zeros(2, 1))


def test_a_layer_reached_under_a_second_name_is_tracked_by_either_name() -> None:
    """``named_modules()`` lists a module held under two attributes once; the tracker finds it
    by either name (as ``get_submodule`` does), also with DDP's ``module.`` prefix, and records
    the same features. Reference: the loop NC1 of the layer's output pooled by hand."""

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()
            self.features = self.net[2]  # an alias, as models expose `features` or `backbone`

        def forward(self, x: Tensor) -> Tensor:
            out: Tensor = self.net(x)
            return out

    model = Aliased()
    assert "features" not in dict(model.named_modules())
    x, y = _data()
    with CollapseTracker(model, ["features", "module.features"], NUM_CLASSES) as tracker:
        assert tracker.layers == ["features", "module.features"]
        tracker.update(x, y)
        results = tracker.compute()
    expected = _nc1_brute_force(_by_hand(model.net, x)["2"], y)
    for name in ("features", "module.features"):
        assert float(results[name]["nc1"]) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="name submodules of the model, but got 'featurez'"):
        CollapseTracker(model, ["featurez"], NUM_CLASSES)
    with pytest.raises(ValueError, match="name submodules"):
        CollapseTracker(model, [""], NUM_CLASSES)  # the model itself is not a layer


def test_pooling_modes_and_custom_pool() -> None:
    maps = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pool_features(maps, "mean"), maps.mean(dim=(2, 3)))
    torch.testing.assert_close(pool_features(maps, "max"), maps.amax(dim=(2, 3)))
    torch.testing.assert_close(pool_features(maps, "flatten"), maps.reshape(3, -1))
    assert pool_features(maps[:, :, 0, 0]) is not None
    with pytest.raises(ValueError, match="at least 2-D"):
        pool_features(torch.zeros(3))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        pool_features((maps,))  # type: ignore[arg-type]

    model = _model()
    x, y = _data()
    with CollapseTracker(model, ["0"], NUM_CLASSES, pool="max") as tracker:
        tracker.update(x, y)
        got = tracker.compute()["0"]["nc1"]
    expected = neural_collapse(model[0](x).amax(dim=2).detach(), y, num_classes=NUM_CLASSES)
    assert float(got) == pytest.approx(float(expected["nc1"]), rel=1e-9)

    with CollapseTracker(model, ["0"], NUM_CLASSES, pool=lambda out: out[:, :, :2].flatten(1)) as t:
        t.update(x, y)
        assert t.metrics["0"].compute()["nc1"] > 0
    with (
        CollapseTracker(model, ["0"], NUM_CLASSES, pool=lambda out: out[:5, :, 0]) as t,
        pytest.raises(ValueError, match="one row per target"),
    ):
        t.update(x, y)


def test_half_precision_outputs_are_pooled_in_float32_and_classifier_reaches_metric() -> None:
    model = _model().float()
    x, y = _data()
    x = x.float()
    head = model[5]
    factory = {"4": lambda: NeuralCollapse(NUM_CLASSES, classifier=head)}

    with CollapseTracker(
        model,
        ["0", "4"],
        NUM_CLASSES,
        metric_factory=lambda name: factory.get(name, lambda: NeuralCollapse(NUM_CLASSES))(),
    ) as tracker:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), tracker.targets(y):
            low = model[:5](x)
        results = tracker.compute()
    assert "nc3" in results["4"]  # the classifier was given to the last layer's metric only
    assert "nc3" not in results["0"]
    reference = neural_collapse(
        low.float(), y, num_classes=NUM_CLASSES, weight=head.weight.detach()
    )
    # the tracker saw the same bfloat16 values, widened to float32 before the metric
    assert float(results["4"]["nc1"]) == pytest.approx(float(reference["nc1"]), rel=1e-6)
    assert float(results["4"]["nc3"]) == pytest.approx(float(reference["nc3"]), rel=1e-6)


def test_on_a_device_without_float64_the_metrics_stay_on_the_cpu() -> None:
    # Apple's MPS has no float64, which the metrics accumulate in: the tracker keeps them on the
    # CPU and feeds them copies of the features. Here the pooled features and the targets are
    # tensors that claim the "mps" device and refuse float64 (their values stay on the CPU).
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    model = _model().float()
    x, y = _data(seed=seed)
    x = x.float()
    seen: list[Tensor] = []

    def pool_on_mps(output: Tensor) -> Tensor:
        pooled = pool_features(output)
        seen.append(pooled)
        return OnDevice(pooled, "mps")

    with CollapseTracker(model, ["2", "4"], NUM_CLASSES, pool=pool_on_mps) as tracker:
        OnDevice.copies_to_cpu = 0
        for chunk in torch.arange(len(y)).split(40):
            tracker.update(x[chunk], OnDevice(y[chunk], "mps"))
        assert OnDevice.copies_to_cpu == 2 * 3 * 2  # features and targets, per batch and layer
        results = tracker.compute()
    for index, name in enumerate(["2", "4"]):
        metric = tracker.metrics[name]
        assert metric.device == torch.device("cpu"), f"seed {seed}"
        expected = _nc1_brute_force(torch.cat(seen[index::2]).double(), y)
        # the same float32 features in float64 statistics: agreement to float64 rounding
        assert float(results[name]["nc1"]) == pytest.approx(expected, rel=1e-9), f"seed {seed}"


def test_only_mps_is_taken_for_a_device_without_float64() -> None:
    for device, holds in (("cpu", True), ("cuda", True), ("meta", True), ("mps", False)):
        assert _holds_float64(torch.device(device)) is holds, device


def _tracked_in_ddp(rank: int, world_size: int, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model = nn.parallel.DistributedDataParallel(_model())
    rows = torch.arange(rank, len(y), world_size)
    with CollapseTracker(model, ["module.0", "4"], NUM_CLASSES) as tracker:
        tracker.update(x[rows], y[rows])
        results = tracker.compute()
    return {name: values["nc1"] for name, values in results.items()}


@pytest.mark.ddp
def test_tracker_under_ddp_equals_one_process() -> None:
    x, y = _data()
    ranks = run_distributed(_tracked_in_ddp, 2, x, y)
    with CollapseTracker(_model(), ["0", "4"], NUM_CLASSES) as tracker:
        tracker.update(x, y)
        single = tracker.compute()
    for result in ranks:
        assert list(result) == ["module.0", "4"]
        # float64 statistics summed over two processes instead of one: rounding-level agreement
        torch.testing.assert_close(result["module.0"], single["0"]["nc1"], rtol=1e-9, atol=0)
        torch.testing.assert_close(result["4"], single["4"]["nc1"], rtol=1e-9, atol=0)


class _Branches(nn.Module):
    """A layer ``aux`` that only some forward passes run (a branch taken on some ranks only)
    and a layer ``unused`` that none run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 6).double()
        self.aux = nn.Linear(6, 6).double()
        self.unused = nn.Linear(6, 6).double()
        self.fc = nn.Linear(6, NUM_CLASSES).double()

    def forward(self, x: Tensor, use_aux: bool) -> Tensor:
        h = torch.relu(self.a(x))
        if use_aux:
            h = self.aux(h)
        out: Tensor = self.fc(h)
        return out


def _branches_data(seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = (torch.arange(80) // 2) % NUM_CLASSES  # every class on both ranks
    x = torch.randn(80, 5, generator=generator, dtype=torch.float64)
    return x + target.view(80, 1).double(), target


def _branches_in_ddp(
    rank: int, world_size: int, x: Tensor, y: Tensor
) -> list[tuple[dict[str, float], list[str]]]:
    model = _Branches()
    rounds = []
    with CollapseTracker(model, ["a", "aux", "unused"], NUM_CLASSES) as tracker:
        for half in (slice(0, 40), slice(40, 80)):  # the second after an inference-mode compute
            rows = torch.arange(len(y))[half][rank::world_size]
            with torch.no_grad(), tracker.targets(y[rows]):
                model(x[rows], use_aux=rank == 0)  # aux: rank 0 only
            with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
                warnings.simplefilter("always")
                results = tracker.compute()
            values = {name: float(out["nc1"]) for name, out in results.items()}
            rounds.append((values, [str(w.message) for w in caught]))
    return rounds


@pytest.mark.ddp
def test_tracker_under_ddp_computes_a_layer_that_some_ranks_never_ran() -> None:
    """Which layers are silent is decided over all ranks: a layer run on rank 0 only is computed
    on both (the same collectives on every rank), over rank 0's samples; a layer run nowhere is
    left out on both. A compute under ``torch.inference_mode()`` leaves states that the next
    updates, outside it, may write."""
    seed = int(torch.randint(0, 2**31, ()))  # fresh inputs, reported on failure
    x, y = _branches_data(seed)
    ranks = run_distributed(_branches_in_ddp, 2, x, y)
    model = _Branches()
    with torch.no_grad():  # the outputs of the hooked layers
        hidden = model.a(x)
        aux = model.aux(torch.relu(hidden))
    for number, seen in enumerate((slice(0, 40), slice(0, 80))):
        rows = torch.arange(len(y))[seen]
        rank0 = rows[rows % 2 == 0]  # rank 0: the even rows of each half
        expected = {
            "a": _nc1_brute_force(hidden[rows], y[rows]),
            "aux": _nc1_brute_force(aux[rank0], y[rank0]),
        }
        for rank, rounds in enumerate(ranks):
            values, messages = rounds[number]
            assert list(values) == ["a", "aux"], f"rank {rank}, seed {seed}"
            for name, value in expected.items():
                assert values[name] == pytest.approx(value, rel=1e-9), f"{name}, seed {seed}"
            silent = [m for m in messages if "recorded no samples" in m]
            assert len(silent) == 1, f"rank {rank}: {messages}"
            assert "['unused']" in silent[0], f"rank {rank}: {silent}"


def test_tracker_reset_inside_an_inference_mode_evaluation_then_tracks_again() -> None:
    # the last hidden layer's metric holds the classifier: its statistics are allocated in advance
    model = _model()
    x, y = _data()
    with CollapseTracker(model, ["4"], NUM_CLASSES, metric_kwargs={"classifier": model[5]}) as t:
        t.update(x[:48], y[:48])
        with torch.inference_mode():  # an evaluation that logs and resets
            t.compute()
            t.reset()
        t.update(x[48:], y[48:])
        got = t.compute()["4"]
    features = _by_hand(model, x[48:])["4"]
    assert float(got["nc1"]) == pytest.approx(_nc1_brute_force(features, y[48:]), rel=1e-9)
    expected = neural_collapse(
        features, y[48:], num_classes=NUM_CLASSES, weight=model[5].weight.detach()
    )
    assert float(got["nc3"]) == pytest.approx(float(expected["nc3"]), rel=1e-9)


def test_repr_names_layers() -> None:
    with CollapseTracker(_model(), ["0"], NUM_CLASSES) as tracker:
        assert repr(tracker) == "CollapseTracker(layers=['0'], num_classes=4, pool='mean', hooks=1)"


# ------------------------------------------------------------------------------ README API tour


def _python_blocks(markdown: str, heading: str) -> list[str]:
    """The ```python blocks of the section that starts at ``heading`` (up to the next ``## ``)."""
    start = markdown.find(heading + "\n")
    if start < 0:
        return []
    end = markdown.find("\n## ", start + len(heading))
    section = markdown[start : end if end >= 0 else None]
    return [part.split("```", 1)[0] for part in section.split("```python\n")[1:]]


def _lightning_stub() -> dict[str, object]:
    """``lightning.pytorch`` with a LightningModule that records ``self.log`` calls."""
    import types

    class LightningModule(nn.Module):
        def log(self, name: str, value: object, **kwargs: object) -> None:
            self.__dict__.setdefault("logged", {})[name] = value

    package = types.ModuleType("lightning")
    pytorch = types.ModuleType("lightning.pytorch")
    pytorch.LightningModule = LightningModule  # type: ignore[attr-defined]
    package.pytorch = pytorch  # type: ignore[attr-defined]
    return {"lightning": package, "lightning.pytorch": pytorch}


def run_api_tour(markdown: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Run the README's API tour blocks in one namespace; returns the namespace."""
    import importlib.util
    import sys

    blocks = _python_blocks(markdown, "## API tour")
    # a renamed or emptied section fails rather than skips: the tour would go untested
    assert blocks, "README.md has no '## API tour' section with ```python blocks"
    stubbed = importlib.util.find_spec("lightning") is None
    if stubbed:
        for name, module in _lightning_stub().items():
            monkeypatch.setitem(sys.modules, name, module)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "readme_tour"}
    for block in blocks:
        exec(compile(block, "README.md (API tour)", "exec"), namespace)
    if stubbed:  # drive the Lightning module once and check what it logs
        lit = namespace["lit"]
        x, y = torch.randn(20, 1, 40), torch.arange(20) % 10
        loss = lit.training_step((x, y), 0)  # type: ignore[attr-defined]
        assert loss.requires_grad
        assert isinstance(lit.logged["train/nc1"], Metric)  # type: ignore[attr-defined]
    return namespace


def test_readme_api_tour_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    namespace = run_api_tour(readme.read_text(), monkeypatch)
    per_layer = namespace["per_layer"]
    assert set(per_layer) == {"0.1", "0.3"}  # type: ignore[arg-type]


class _Reused(nn.Module):
    """A shared activation called twice per forward, as in torchvision's BasicBlock."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.act, self.second = nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)  # never called

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(self.first(x))
        return self.act(self.second(hidden))


def test_reused_module_records_its_first_call_once_and_silent_layers_are_left_out() -> None:
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = _Reused().double()
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.arange(30) % 3
    with CollapseTracker(model, ["act", "unused", "first"], 3) as tracker:
        with pytest.warns(UserWarning, match="'act' ran more than once"):
            tracker.update(x, y)
        with pytest.warns(UserWarning, match="'act' ran more than once"):
            tracker.update(x, y)  # a new targets() block records again
        stats = tracker.metrics["act"].class_statistics()  # type: ignore[operator]
        assert stats.counts.tolist() == [20.0, 20.0, 20.0]  # 2 batches x 10, not 4 x 10
        with pytest.warns(UserWarning, match=r"\['unused'\] recorded no samples"):
            results = tracker.compute()
    assert list(results) == ["act", "first"]
    # the first call's features: ReLU of the first linear layer, twice the same batch
    first_call = torch.relu(model.first(x)).detach()
    expected = neural_collapse(torch.cat([first_call, first_call]), torch.cat([y, y]))
    torch.testing.assert_close(results["act"]["nc1"], expected["nc1"], rtol=1e-10, atol=0)


def test_tracker_computes_metrics_restored_from_a_state_dict() -> None:
    model = _model()
    x, y = _data()
    with CollapseTracker(model, ["4"], NUM_CLASSES) as tracker:
        tracker.update(x, y)
        expected = tracker.compute()["4"]["nc1"]
    for metric in tracker.metrics.values():
        metric.persistent(True)
    saved = {name: metric.state_dict() for name, metric in tracker.metrics.items()}
    with CollapseTracker(model, ["4"], NUM_CLASSES) as restored:
        for name, metric in restored.metrics.items():
            metric.load_state_dict(saved[name])
        assert float(restored.compute()["4"]["nc1"]) == pytest.approx(float(expected), rel=1e-12)


def test_tracker_refuses_multi_device_data_parallel_and_frees_its_hooks_when_dropped() -> None:
    import gc

    model = _model()
    parallel = nn.DataParallel(model)
    parallel.device_ids = [0, 1]  # as on a two-GPU machine (nothing runs here)
    with pytest.raises(ValueError, match=r"nn\.DataParallel over several devices"):
        CollapseTracker(parallel, ["0"], NUM_CLASSES)
    tracker = CollapseTracker(model, ["0", "2"], NUM_CLASSES)
    assert model[0]._forward_hooks
    del tracker
    gc.collect()
    assert not model[0]._forward_hooks
    assert not model[2]._forward_hooks


def test_pool_callable_tracks_token_outputs() -> None:
    # (N, L, D) outputs come features-last: the documented callable pools over the tokens
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0).double()
    model = nn.Sequential(layer).eval()
    x = torch.randn(24, 5, 8, dtype=torch.float64)
    y = torch.arange(24) % 3
    with CollapseTracker(model, ["0"], 3, pool=lambda out: out.mean(1)) as tracker:
        tracker.update(x, y)
        assert tracker.metrics["0"].class_statistics().num_features == 8  # type: ignore[operator]
        got = tracker.compute()["0"]["nc1"]
    with torch.no_grad():
        expected = neural_collapse(model(x).mean(1), y)["nc1"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_tracker_computes_restored_single_quantity_metrics() -> None:
    from torchcollapse.metrics import NeuralCollapseNC1

    model = _model()
    x, y = _data()
    factory = lambda name: NeuralCollapseNC1(NUM_CLASSES)  # noqa: E731
    with CollapseTracker(model, ["4"], NUM_CLASSES, metric_factory=factory) as tracker:
        tracker.update(x, y)
        expected = tracker.compute()["4"]
        tracker.metrics["4"].persistent(True)
        saved = tracker.metrics["4"].state_dict()
    with CollapseTracker(model, ["4"], NUM_CLASSES, metric_factory=factory) as restored:
        restored.metrics["4"].load_state_dict(saved)
        got = restored.compute()["4"]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_num_classes_is_read_as_the_other_sizes_are() -> None:
    """``num_classes`` takes any integer (numpy's, 0-dim tensors); a non-integer is a
    ``TypeError`` and a value below 2 a ``ValueError``, both naming the argument, as the heads'
    and the metrics' sizes."""
    import numpy as np

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    for value in (np.int64(3), torch.tensor(3), 3):
        assert CollapseTracker(model, ["0"], value).num_classes == 3  # type: ignore[arg-type]
    for bad in (2.5, "3", True):
        with pytest.raises(TypeError, match="`num_classes` to be an integer"):
            CollapseTracker(model, ["0"], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_classes` to be at least 2, but got 1"):
        CollapseTracker(model, ["0"], 1)


def test_tracker_on_a_compiled_model_keeps_its_graph_and_equals_the_eager_tracker() -> None:
    # The hooks of a compiled model are traced with it: they must not break its graph (a graph
    # break in a hook splits the model and leaves most of it eager), and what they record must
    # equal the tracker on the plain model. Inputs drawn fresh; the "eager" backend runs the
    # traced graph op by op, so the values agree to float64 rounding.
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    seed = int(torch.randint(0, 2**31, ()))
    model = _model()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 2, 12, generator=generator, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (96,), generator=generator)
    x = x + y.view(-1, 1, 1).double()
    torch._dynamo.reset()
    try:
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter)
        tracker = CollapseTracker(compiled, ["0", "2", "4"], NUM_CLASSES)
        reference = CollapseTracker(_model(), ["0", "2", "4"], NUM_CLASSES)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        reference_model = reference.model
        reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.01)
        for xb, yb in zip(x.split(32), y.split(32), strict=True):  # train while tracking
            for net, opt, track in (
                (compiled, optimizer, tracker),
                (reference_model, reference_optimizer, reference),
            ):
                with track.targets(yb):
                    loss = nn.functional.cross_entropy(net(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            compiled(xb)  # outside targets(): nothing recorded
        assert counter.frame_count <= 2, f"seed {seed}"  # with the hooks' work, and without
        with tracker.targets(y[:32]):  # the same hooks, traced anew with the plain model
            explanation = torch._dynamo.explain(model)(x[:32])
        assert explanation.graph_count == 1, f"seed {seed}"
        assert explanation.graph_break_count == 0, f"seed {seed}"
        assert [m.update_count for m in tracker.metrics.values()] == [4, 4, 4], f"seed {seed}"
        tracker.reset()
        reference.reset()
        with torch.no_grad():
            for xb, yb in zip(x.split(48), y.split(48), strict=True):
                with tracker.targets(yb):
                    compiled(xb)
                reference.update(xb, yb)
        got, expected = tracker.compute(), reference.compute()
        for layer in ("0", "2", "4"):
            for key in ("nc1", "cdnv", "nc2_etf_distance"):
                torch.testing.assert_close(
                    got[layer][key], expected[layer][key], rtol=1e-10, atol=1e-12
                )

        # a layer run twice in one block warns when the block ends, as in eager mode
        def twice() -> None:
            with tracker.targets(y[:32]):
                compiled(x[:32])
                compiled(x[:32])

        with pytest.warns(UserWarning, match="ran more than once") as caught:
            twice()
        assert [str(w.message).split("'")[1] for w in caught] == ["0", "2", "4"]
    finally:
        torch._dynamo.reset()


def test_tracker_made_after_a_compiled_model_ran_and_nested_blocks_under_compile() -> None:
    """Graphs compiled before the hooks existed do not call them (dynamo does not guard on
    hooks): a tracker made on a compiled model that already ran (same grad mode, no reason to
    recompile) resets the compiled code, so its layers record; ``remove()`` does the same, so a
    second tracker records too. Features queued by compiled hooks for an outer ``targets()``
    block are recorded with the outer targets when an inner block (``update``) begins. Reference:
    the same forward passes through the plain model, tracked eagerly (float64, rtol 1e-10)."""
    import torch._dynamo

    seed = int(torch.randint(0, 2**31, ()))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 2, 12, generator=generator, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (60,), generator=generator)
    x = x + y.view(-1, 1, 1).double()
    model = _model()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")
        compiled(x[:20])  # compiled and run before any tracker exists
        first = CollapseTracker(compiled, ["2"], NUM_CLASSES)
        with first.targets(y[:20]):
            compiled(x[:20])
        assert first.metrics["2"].update_count == 1, f"seed {seed}"
        first.remove()
        tracker = CollapseTracker(compiled, ["0", "4"], NUM_CLASSES)
        eager = CollapseTracker(model, ["0", "4"], NUM_CLASSES)
        for net, track in ((compiled, tracker), (model, eager)):
            with track.targets(y[:20]):  # an outer block of 20, an inner one of 40
                net(x[:20])
                track.update(x[20:], y[20:])
        for name in ("0", "4"):
            assert tracker.metrics[name].update_count == 2, f"seed {seed}"
            expected = eager.compute()[name]["nc1"]
            torch.testing.assert_close(
                tracker.compute()[name]["nc1"], expected, rtol=1e-10, atol=0, msg=f"seed {seed}"
            )
        assert first.metrics["2"].update_count == 1  # the removed tracker records no more
    finally:
        torch._dynamo.reset()


def test_layer_names_of_a_compiled_model_are_those_of_the_inner_model() -> None:
    """Layers chosen by type or predicate on a compiled model are named as on the plain model
    (they came out with an ``_orig_mod.`` prefix, so turning compile on renamed the results);
    a name with that prefix is accepted, as ``module.`` is for DDP."""
    import torch._dynamo

    model = _model()
    try:
        compiled = torch.compile(model, backend="eager")
        plain = CollapseTracker(model, nn.Conv1d, NUM_CLASSES).layers
        assert CollapseTracker(compiled, nn.Conv1d, NUM_CLASSES).layers == plain
        by_predicate = CollapseTracker(compiled, lambda n, m: isinstance(m, nn.Conv1d), 3)
        assert by_predicate.layers == plain
        prefixed = CollapseTracker(compiled, ["_orig_mod.0"], NUM_CLASSES)
        assert prefixed.modules["_orig_mod.0"] is model[0]
    finally:
        torch._dynamo.reset()


def test_a_warning_at_the_end_of_a_compiled_block_points_at_the_users_line() -> None:
    """On a compiled model the layers' outputs are recorded when the ``targets()`` block ends,
    inside ``contextlib``'s exit: the "ran more than once" warning then names the user's file,
    not ``contextlib.py``."""
    import warnings

    import torch._dynamo

    model = _model()
    x, y = torch.randn(8, 2, 12, dtype=torch.float64), torch.arange(8) % NUM_CLASSES
    try:
        compiled = torch.compile(model, backend="eager")
        tracker = CollapseTracker(compiled, ["0"], NUM_CLASSES)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with tracker.targets(y):
                compiled(x)
                compiled(x)  # the layer runs twice in one block
        repeats = [w for w in caught if "more than once" in str(w.message)]
        assert [w.filename for w in repeats] == [__file__]
    finally:
        torch._dynamo.reset()


def _fresh_data(n: int = 96) -> tuple[Tensor, Tensor]:
    """``_data`` drawn from a fresh seed (reported by the caller on failure)."""
    return _data(n, seed=int(torch.randint(0, 2**31, ())))


def _assert_equals_reference(
    tracker: CollapseTracker, model: nn.Sequential, x: Tensor, y: Tensor
) -> None:
    """The tracker's results equal ``neural_collapse`` on ``model``'s outputs pooled by hand."""
    results = tracker.compute()
    for name, features in _by_hand(model, x).items():
        expected = neural_collapse(features, y, num_classes=NUM_CLASSES)
        for key in ("nc1", "cdnv", "nc2_etf_distance"):
            # float64 inputs, exact streaming: agreement to float64 rounding of the statistics
            torch.testing.assert_close(
                results[name][key].double(), expected[key].double(), rtol=1e-9, atol=1e-12
            )


def test_a_model_saved_or_copied_under_a_live_tracker_carries_inert_hooks() -> None:
    """``torch.save(model)``, ``pickle`` and ``copy.deepcopy`` of a model hooked by a live tracker
    (a mid-training checkpoint, an EMA copy) work; the copies' hooks record nothing, even run
    inside the original's ``targets()``, do not break a compiled graph, and the original keeps
    recording."""
    import copy
    import io
    import pickle

    import torch._dynamo

    model = _model()
    x, y = _fresh_data()
    tracker = CollapseTracker(model, ["0", "2", "4"], NUM_CLASSES)
    tracker.update(x[:48], y[:48])
    before = {name: metric.statistics.clone() for name, metric in tracker.metrics.items()}  # type: ignore[union-attr]

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {
        "torch.save": torch.load(buffer, weights_only=False),
        "pickle": pickle.loads(pickle.dumps(model)),
        "deepcopy": copy.deepcopy(model),
    }
    for how, copied in copies.items():
        assert [len(m._forward_hooks) for m in copied] == [1, 0, 1, 0, 1, 0], how  # inert
        with torch.no_grad(), tracker.targets(y[48:]):  # the original records; the copy must not
            out = copied(x[48:])
        torch.testing.assert_close(out, model(x[48:]), rtol=0, atol=0)
        for name, metric in tracker.metrics.items():
            assert metric.update_count == 1, (how, name)
            torch.testing.assert_close(metric.statistics, before[name], rtol=0, atol=0)  # type: ignore[union-attr]
    torch._dynamo.reset()
    try:  # an inert hook is traced as a no-op, without a graph break
        explanation = torch._dynamo.explain(copies["deepcopy"])(x[:32])
        assert explanation.graph_count == 1
        assert explanation.graph_break_count == 0
    finally:
        torch._dynamo.reset()

    tracker.reset()
    tracker.update(x[:40], y[:40])  # the original keeps recording, into its own metrics only
    tracker.update(x[40:], y[40:])
    _assert_equals_reference(tracker, model, x, y)
    tracker.remove()
    assert not any(m._forward_hooks for m in model)


class _HoldsItsTracker(nn.Module):
    """A model that keeps its own tracker as an attribute (as a LightningModule may)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _model()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


def test_a_model_holding_its_own_tracker_copies_and_pickles() -> None:
    """The model holds the tracker and the tracker the model: ``pickle`` and ``copy.deepcopy``
    build the tracker's copy before the model's (an AttributeError on the half-built model);
    the copy's tracker records the copied model into its own metrics, as the reference says."""
    import copy
    import pickle

    model = _HoldsItsTracker()
    x, y = _fresh_data()
    model.tracker = CollapseTracker(model, ["body.0", "body.4"], NUM_CLASSES)
    model.tracker.update(x[:48], y[:48])
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        tracker = copied.tracker
        assert tracker.model is copied
        assert tracker is not model.tracker
        assert tracker.num_hooks == 2
        tracker.update(x[48:], y[48:])
        results = tracker.compute()
        body = copied.body
        pooled = _by_hand(body, x)
        for name in ("0", "4"):
            expected = neural_collapse(pooled[name], y, num_classes=NUM_CLASSES)
            torch.testing.assert_close(
                results["body." + name]["nc1"].double(),
                expected["nc1"].double(),
                rtol=1e-9,
                atol=1e-12,
            )
    assert model.tracker.metrics["body.0"].update_count == 1  # the original is untouched


def test_a_copied_tracker_records_its_copied_model_into_its_own_metrics() -> None:
    """``copy.deepcopy(tracker)`` and ``pickle`` copy the model and the metrics and hook the copied
    layers into the copy (in place of the copied inert hooks): the copy records its own model's
    batches, the original its own, and removing one's hooks leaves the other's."""
    import copy
    import pickle

    model = _model()
    x, y = _fresh_data()
    tracker = CollapseTracker(model, ["0", "2", "4"], NUM_CLASSES)
    tracker.update(x[:48], y[:48])
    for how, copied in (
        ("deepcopy", copy.deepcopy(tracker)),
        ("pickle", pickle.loads(pickle.dumps(tracker))),
    ):
        assert copied.model is not model, how
        assert copied.num_hooks == 3, how
        assert [len(m._forward_hooks) for m in copied.model] == [1, 0, 1, 0, 1, 0], how
        assert all(copied.modules[name] is copied.model[int(name)] for name in copied.layers)
        with torch.no_grad():  # the copy's model diverges from the original (an EMA, say)
            for parameter in copied.model.parameters():
                parameter.mul_(0.5)
        with torch.no_grad(), tracker.targets(y[48:]):  # the copy's model runs in neither block
            copied.model(x[48:])
        copied.update(x[48:], y[48:])
        assert [m.update_count for m in copied.metrics.values()] == [2, 2, 2], how
        assert [m.update_count for m in tracker.metrics.values()] == [1, 1, 1], how
        # what the copy holds: the original's first half, then its own model's second half
        first, second = _by_hand(model, x[:48]), _by_hand(copied.model, x[48:])
        results = copied.compute()
        for name in copied.layers:
            features = torch.cat([first[name], second[name]])
            expected = neural_collapse(features, y, num_classes=NUM_CLASSES)
            for key in ("nc1", "cdnv", "nc2_etf_distance"):
                torch.testing.assert_close(
                    results[name][key].double(), expected[key].double(), rtol=1e-9, atol=1e-12
                )
        copied.remove()
        assert not any(m._forward_hooks for m in copied.model), how
        assert tracker.num_hooks == 3, how

    with pytest.raises(TypeError, match=r"copy\.deepcopy"):
        copy.copy(tracker)  # would share the model and the metrics
    with torch.no_grad(), tracker.targets(y[48:]):  # a copy made inside a block is outside it
        inside = copy.deepcopy(tracker)
    assert inside.num_hooks == 3
    inside.model(x[48:])
    assert [m.update_count for m in inside.metrics.values()] == [1, 1, 1]
    tracker.update(x[48:], y[48:])  # the original, untouched by its copies
    _assert_equals_reference(tracker, model, x, y)
    tracker.remove()
    removed = copy.deepcopy(tracker)  # a copy of a removed tracker has no hooks either
    assert removed.num_hooks == 0
    assert not any(m._forward_hooks for m in removed.model)


# Run twice, each time in a new process: "save" hooks a model (a user hook on each tracked layer,
# one of them taking kwargs) and saves a tracker of it; "load" loads the tracker and records.
_TRACKER_IN_A_NEW_PROCESS = """
import sys
import torch
from torchcollapse.tracking import CollapseTracker

class PlainHook:
    calls = 0
    def __call__(self, module, inputs, output):
        self.calls += 1

class KwargsHook:
    calls = 0
    def __call__(self, module, args, kwargs, output):
        self.calls += 1

mode, folder = sys.argv[1], sys.argv[2]
x, y = torch.load(folder + "/data.pt")
if mode == "save":
    model = torch.load(folder + "/model.pt", weights_only=False)
    model[0].register_forward_hook(PlainHook())
    model[4].register_forward_hook(KwargsHook(), with_kwargs=True)
    tracker = CollapseTracker(model, ["0", "4"], 4)
    tracker.update(x[:48], y[:48])
    torch.save(tracker, folder + "/tracker.pt")
else:
    tracker = torch.load(folder + "/tracker.pt", weights_only=False)
    tracker.update(x[48:], y[48:])
    model = tracker.model
    every = [hook for layer in (0, 4) for hook in model[layer]._forward_hooks.values()]
    hooks = [type(hook).__name__ for hook in every]
    calls = [hook.calls for hook in every if hasattr(hook, "calls")]
    torch.save({"hooks": hooks, "calls": calls, "results": tracker.compute(),
                "state": model.state_dict()}, folder + "/loaded.pt")
"""


def test_a_tracker_loaded_in_a_new_process_keeps_the_other_hooks_of_its_layers(
    tmp_path: Path,
) -> None:
    """A tracker saved whole and loaded in a new process (whose hook counter starts again at 0)
    hooks its layers under new ids: the other forward hooks of those layers (one with kwargs)
    stay and run, and the tracker records the batches of both processes."""
    import os
    import subprocess
    import sys

    import torchcollapse

    model = _model()
    x, y = _fresh_data()
    torch.save(model, tmp_path / "model.pt")
    torch.save((x, y), tmp_path / "data.pt")
    src = str(Path(torchcollapse.__file__).resolve().parents[1])  # the checkout under test
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    for mode in ("save", "load"):
        command = [sys.executable, "-c", _TRACKER_IN_A_NEW_PROCESS, mode, str(tmp_path)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    assert loaded["hooks"] == ["PlainHook", "_TrackerHook", "KwargsHook", "_TrackerHook"]
    assert loaded["calls"] == [2, 2]  # the user's hooks ran in both processes (counts saved)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded["state"][name], tensor, rtol=0, atol=0)
    by_hand = _by_hand(model, x)
    for name in ("0", "4"):  # the first half recorded before saving, the second after loading
        expected = neural_collapse(by_hand[name], y, num_classes=NUM_CLASSES)
        for key in ("nc1", "cdnv", "nc2_etf_distance"):
            # float64 features, exact streaming merge: agreement to float64 rounding
            torch.testing.assert_close(
                loaded["results"][name][key].double(), expected[key].double(), rtol=1e-9, atol=1e-12
            )
