"""replace_head / find_head on look-alikes of torchvision and timm models and on nn.Sequential."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from torchcollapse.heads import CosineHead, SimplexETFHead, find_head, replace_head


class ResNetLike(nn.Module):
    """torchvision ResNet: ``self.fc`` after global pooling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.conv1(x)), 1))


class VGGLike(nn.Module):
    """torchvision VGG / AlexNet / MobileNet: ``self.classifier`` Sequential ending in Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(16, 12), nn.ReLU(True), nn.Dropout(), nn.Linear(12, 7)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DenseNetLike(nn.Module):
    """torchvision DenseNet: ``self.classifier`` is the Linear itself."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 6, 1)
        self.classifier = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class ViTLike(nn.Module):
    """torchvision VisionTransformer: ``self.heads = Sequential(OrderedDict(head=Linear))``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(12, 12)
        self.heads = nn.Sequential(OrderedDict([("head", nn.Linear(12, 9))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.encoder(x))


class SwinLike(nn.Module):
    """torchvision Swin: ``self.head`` is the Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TimmLike(nn.Module):
    """A timm model: the classifier lives somewhere of the model's choosing (here
    ``head.last_linear``, nested); ``get_classifier()`` returns it and ``reset_classifier()``
    rebuilds it; ``forward_head`` applies it."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.num_features = 10
        self.num_classes = num_classes
        self.stem = nn.Linear(4, self.num_features)
        self.head = nn.Module()
        self.head.last_linear = nn.Linear(self.num_features, num_classes)
        self.fc = nn.Linear(4, 4)  # a decoy: timm's own answer must win over the `fc` convention

    def get_classifier(self) -> nn.Module:
        return self.head.last_linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.last_linear = nn.Linear(self.num_features, num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.stem(x))


def check_replaced(model: nn.Module, x: torch.Tensor, name: str, shape: tuple[int, int]) -> None:
    old_name, old = find_head(model)
    assert old_name == name
    seen: list[tuple[int, int]] = []

    def factory(in_features: int, num_classes: int) -> nn.Module:
        seen.append((in_features, num_classes))
        return SimplexETFHead(in_features, num_classes)

    returned = replace_head(model, factory)
    assert returned is old
    assert seen == [shape]
    new = model.get_submodule(name)
    assert isinstance(new, SimplexETFHead)
    assert find_head(model) == (name, new)  # found again: replace_head can be applied twice
    logits = model(x).detach()
    assert logits.shape == (x.shape[0], shape[1])
    # the model's output now comes from the new head: scale times cosines
    assert float(logits.abs().max()) <= new.scale + 1e-5


@pytest.mark.parametrize(
    ("model", "x", "name", "shape"),
    [
        (ResNetLike(), torch.randn(2, 3, 8, 8), "fc", (16, 10)),
        (VGGLike(), torch.randn(2, 3, 8, 8), "classifier.3", (12, 7)),
        (DenseNetLike(), torch.randn(2, 3, 4, 4), "classifier", (6, 5)),
        (ViTLike(), torch.randn(2, 12), "heads.head", (12, 9)),
        (SwinLike(), torch.randn(2, 5), "head", (5, 3)),
        (TimmLike(), torch.randn(2, 4), "head.last_linear", (10, 6)),
        (
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
            torch.randn(2, 4),
            "2",
            (8, 3),
        ),
        (  # parameter-free layers after the classifier stay in place
            nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3), nn.Dropout(0.0), nn.Identity()),
            torch.randn(2, 4),
            "1",
            (8, 3),
        ),
        (  # the README's Sequential(backbone, head), the head with dropout before it
            nn.Sequential(
                nn.Sequential(nn.Linear(4, 32), nn.ReLU()),
                nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10)),
            ),
            torch.randn(2, 4),
            "1.1",
            (32, 10),
        ),
        (  # nested twice, parameter-free layers after it at both levels
            nn.Sequential(
                nn.Linear(4, 8),
                nn.Sequential(nn.Sequential(nn.Linear(8, 3), nn.Identity()), nn.Dropout(0.0)),
                nn.Identity(),
            ),
            torch.randn(2, 4),
            "1.0.0",
            (8, 3),
        ),
    ],
    ids=[
        "resnet",
        "vgg",
        "densenet",
        "vit",
        "swin",
        "timm",
        "sequential",
        "sequential_dropout",
        "nested_sequential",
        "nested_twice",
    ],
)
def test_replace_head(model: nn.Module, x: torch.Tensor, name: str, shape: tuple[int, int]) -> None:
    check_replaced(model, x, name, shape)


def test_a_classifier_in_a_trailing_sequential_is_replaced_in_place() -> None:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32))
    classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))
    model = nn.Sequential(backbone, classifier)
    linear = classifier[1]
    assert replace_head(model, SimplexETFHead) is linear  # exactly that Linear is replaced
    assert model[1] is classifier  # the rest stays in place
    assert isinstance(classifier[0], nn.Dropout)
    head = classifier[1]
    assert isinstance(head, SimplexETFHead)
    assert (head.in_features, head.num_classes) == (32, 10)
    x = torch.randn(5, 4, 10)
    model.eval()
    torch.testing.assert_close(model(x), head(backbone(x)), rtol=0, atol=0)
    # a layer with parameters after the nested classifier: not a classifier
    with pytest.raises(ValueError, match="Could not find the classifier of Sequential"):
        find_head(nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 3), nn.LayerNorm(3))))


def test_a_lazy_classifier_not_yet_initialised_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.LazyLinear(10))
    with pytest.raises(
        ValueError,
        match=r"`2` of Sequential is a lazy module \(LazyLinear\).*"
        r"run one forward pass",
    ):
        replace_head(model, SimplexETFHead)
    assert isinstance(model[2], nn.LazyLinear)  # left as it was
    model(torch.randn(3, 2, 6))  # initialises it: in_features = 12
    old = replace_head(model, SimplexETFHead)
    assert (old.in_features, old.out_features) == (12, 10)  # type: ignore[union-attr]
    assert isinstance(model[2], SimplexETFHead)
    assert model[2].in_features == 12


def test_timm_interface_sees_the_new_head() -> None:
    model = TimmLike()
    replace_head(model, lambda d, k: CosineHead(d, k))
    assert isinstance(model.get_classifier(), CosineHead)
    assert model.forward_head(model.stem(torch.randn(3, 4))).shape == (3, 6)


def test_sequential_keeps_its_order() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(dim=1))
    replace_head(model, SimplexETFHead)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "SimplexETFHead", "LogSoftmax"]


def test_new_head_takes_the_old_heads_dtype() -> None:
    model = ResNetLike().double()
    replace_head(model, SimplexETFHead)
    assert model.fc.frame.dtype == torch.float64
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_no_classifier_is_a_clear_error() -> None:
    class SqueezeNetLike(nn.Module):  # torchvision SqueezeNet: a convolutional classifier
        def __init__(self) -> None:
            super().__init__()
            self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(8, 4, 1), nn.ReLU())

    with pytest.raises(
        ValueError, match=r"classifier of SqueezeNetLike: looked for `get_classifier\(\)`"
    ):
        replace_head(SqueezeNetLike(), SimplexETFHead)
    # a Sequential whose last Linear is followed by a layer with parameters
    with pytest.raises(ValueError, match=r"trailing `nn\.Linear` in an `nn\.Sequential`"):
        find_head(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    with pytest.raises(TypeError, match=r"`model` to be an nn\.Module"):
        find_head("resnet18")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`factory` to return an nn\.Module"):
        replace_head(ResNetLike(), lambda d, k: None)  # type: ignore[arg-type,return-value]


def test_find_head_skips_a_classifier_wrapper_whose_classifier_was_removed() -> None:
    # timm's reset_classifier(0): the wrapper keeps `in_features` but has `num_classes = 0` and an
    # identity inside; it is no classifier to replace.
    class ClassifierHeadLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.num_classes = 10, 0
            self.fc = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = nn.Module()
    model.stem = nn.Linear(4, 10)
    model.head = ClassifierHeadLike()
    with pytest.raises(ValueError, match="classifier"):
        find_head(model)


def test_a_distilled_model_with_two_classifiers_is_a_clear_error() -> None:
    # timm's distilled DeiT: get_classifier() returns (head, head_dist), both giving logits;
    # replacing only `head` would leave half the prediction to the old classifier
    class Distilled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.head_dist = nn.Linear(16, 5), nn.Linear(16, 5)

        def get_classifier(self) -> tuple[nn.Module, nn.Module]:
            return self.head, self.head_dist

    model = Distilled()
    with pytest.raises(ValueError, match=r"returns 2 \(head, head_dist; a distilled model\)"):
        replace_head(model, SimplexETFHead)
    assert type(model.head) is nn.Linear
    assert type(model.head_dist) is nn.Linear


def _wrapped_replace(wrap: str) -> tuple[str, bool]:
    """Replace the head of a ResNet look-alike and of an nn.Sequential inside ``wrap``; check
    the inner model's classifier is the new head and the wrapper's output is the new head's."""
    results = []
    for make in (ResNetLike, lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))):
        torch.manual_seed(0)
        inner = make()
        assert isinstance(inner, nn.Module)
        if wrap == "ddp":
            model: nn.Module = nn.parallel.DistributedDataParallel(inner)
        elif wrap == "dp":
            model = nn.DataParallel(inner)  # on CPU: no device, a pass-through
        elif wrap == "ema":
            model = torch.optim.swa_utils.AveragedModel(inner)
            inner = model.module  # a copy of the model
        elif wrap == "compiled":
            model = torch.compile(inner, backend="eager")
        else:  # compiled, then averaged
            model = torch.optim.swa_utils.AveragedModel(torch.compile(inner, backend="eager"))
            inner = model.module._orig_mod
        name, old = find_head(model)
        assert model.get_submodule(name) is old
        expected_old = inner.fc if isinstance(inner, ResNetLike) else inner[2]
        assert old is expected_old
        assert replace_head(model, SimplexETFHead) is old
        head = inner.fc if isinstance(inner, ResNetLike) else inner[2]
        assert isinstance(head, SimplexETFHead)
        assert model.get_submodule(name) is head
        x = torch.randn(5, 3, 4, 4) if isinstance(inner, ResNetLike) else torch.randn(5, 6)
        if isinstance(inner, ResNetLike):
            features = torch.flatten(inner.avgpool(inner.conv1(x)), 1)
        else:
            features = inner[1](inner[0](x))
        torch.testing.assert_close(model(x), head(features), rtol=0, atol=0)
        results.append(name)
    return ",".join(results), True


@pytest.mark.parametrize(
    ("wrap", "names"),
    [
        ("dp", "module.fc,module.2"),
        ("ema", "module.fc,module.2"),
        ("compiled", "_orig_mod.fc,_orig_mod.2"),
        ("compiled_ema", "module._orig_mod.fc,module._orig_mod.2"),
    ],
)
def test_replace_head_reaches_inside_data_parallel_averaged_and_compiled_models(
    wrap: str, names: str
) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    try:
        assert _wrapped_replace(wrap) == (names, True)
    finally:
        torch._dynamo.reset()


def test_find_head_reads_through_ddp_and_replace_head_refuses_it() -> None:
    """``find_head`` names the classifier inside ``DistributedDataParallel``; ``replace_head``
    refuses the wrapped model (DDP registered the old head's parameters when it was built: the
    replaced head broke its gradient reduction at the next step) and leaves it as it was."""
    from tests._helpers.ddp import run_distributed

    def work(rank: int, world_size: int) -> tuple[str, str]:
        inner = ResNetLike()
        ddp = nn.parallel.DistributedDataParallel(inner)
        name, old = find_head(ddp)
        assert old is inner.fc
        with pytest.raises(ValueError, match=r"not wrapped in DistributedDataParallel"):
            replace_head(ddp, SimplexETFHead)
        assert inner.fc is old
        return name, type(inner.fc).__name__

    assert run_distributed(work, 1) == [("module.fc", "Linear")]


def test_a_wrapped_model_without_classifier_names_both_in_the_error() -> None:
    wrapped = nn.DataParallel(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"classifier of Sequential \(inside DataParallel\)"):
        find_head(wrapped)


@pytest.mark.parametrize("kind", ["nearest", "cosine_margin"])
def test_heads_that_need_targets_warn_once_when_trained_without_them(kind: str) -> None:
    # After replace_head, `model(x)` never gives the head the labels: NearestETFHead's frame
    # stays put and CosineHead's margin is never applied. Two training calls without target
    # warn, once per head; eval mode, calls with targets, a single unlabelled call before a
    # labelled one (semi-supervised steps) and torch.compile do not.
    import warnings

    import torch._dynamo

    from torchcollapse.heads import NearestETFHead

    def make() -> nn.Module:
        if kind == "nearest":
            return NearestETFHead(8, 4)
        return CosineHead(8, 4, margin=0.35)

    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    replace_head(model, lambda d, k: make())
    head = model[1]
    frame = head.frame.clone() if kind == "nearest" else None
    model(x)  # one call: could be the unlabelled half of a semi-supervised step
    with pytest.warns(UserWarning, match=r"training mode without `target`.*head\(features, t"):
        model(x)
    if frame is not None:  # indeed: the frame did not move
        assert torch.equal(head.frame, frame), f"seed {seed}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model(x)  # once per head
        model.eval()(x)
        for step in range(2):  # a fresh head in eval mode, with targets, or semi-supervised
            fresh = make()
            fresh.eval()(x)
            fresh.eval()(x)
            fresh.train()(x) if step else fresh.train()(x, y)
            fresh(x, y)
            fresh(x)
            fresh(x)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(make().train(), backend="eager", fullgraph=True)
            compiled(x)
            compiled(x)  # no graph break either (fullgraph)
        finally:
            torch._dynamo.reset()


def test_the_library_warnings_point_at_the_users_line() -> None:
    """Warnings raised deep inside a model (a head in an ``nn.Sequential``) or a
    ``MetricCollection`` name the user's file, not torch's or torchmetrics' call machinery
    (a fixed ``stacklevel`` pointed into ``torch/nn/modules/container.py``)."""
    import warnings

    from torchmetrics import MetricCollection

    from torchcollapse.heads import NearestETFHead
    from torchcollapse.metrics import NeuralCollapseNC1, NeuralCollapseNC4

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    replace_head(model, NearestETFHead)
    x = torch.randn(6, 8)
    head = nn.Linear(16, 4)
    collection = MetricCollection(
        {"nc1": NeuralCollapseNC1(4), "nc4": NeuralCollapseNC4(4, classifier=head)}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x)
        model(x)  # the second call without targets warns
        collection.update(torch.randn(12, 16), torch.arange(12) % 4)
        collection.compute()  # NC4 without reference means: NaN with a warning
    messages = {str(w.message).split(" ")[0]: w.filename for w in caught}
    assert messages["NearestETFHead"] == __file__, messages
    assert messages["NeuralCollapseNC4.compute:"] == __file__, messages
