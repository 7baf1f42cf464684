"""Small classifiers with a timm-style split between features and head.

Every model here is ``blocks`` (an ``nn.Sequential`` of named stages that a
:class:`~torchcollapse.tracking.CollapseTracker` can watch), then a ``neck`` that ends the feature
extractor with a linear layer (and BatchNorm by default), then a ``head``:

- ``forward_features(x)``: the penultimate features (the neck's output), ``(N, feature_dim)``;
- ``forward_head(features, pre_logits=False)``: logits; with ``pre_logits=True`` the features the
  head's linear map reads (after its L2 normalisation when the head normalises);
- ``get_classifier()`` / ``reset_classifier(head)`` to swap the head.

Why a linear neck: features that come straight out of a ReLU are non-negative, so their class means
cannot form a simplex ETF centred at the origin; in trials ReLU features in front of a fixed ETF
head stayed misaligned with it (NC3 0.3-0.6 while NC1 was tiny). A final linear layer lets the
features reach the frame (Papyan, Han & Donoho, 2020; Zhu et al., 2021), and BatchNorm keeps them
centred. Models: an MLP and a 1-D CNN for MNIST-1D (Greydanus, 2020) and the CIFAR variant of
ResNet-18 (He et al., 2016: 3x3 stem, no max-pool).
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchcollapse.heads import SimplexETFHead

__all__ = [
    "DEFAULT_SIZES",
    "MLP",
    "MODEL_NAMES",
    "CNN1d",
    "CollapseModel",
    "ResNet18",
    "build_model",
    "head_features",
    "simplex_etf_head",
]


def simplex_etf_head(scale: float | None = None) -> Callable[[int, int], nn.Module]:
    """Head factory ``(in_features, num_classes) ->`` a fixed simplex ETF on L2-normalised features.

    ``scale`` is the logit scale (None: :class:`~torchcollapse.heads.SimplexETFHead`'s default).
    """
    return functools.partial(SimplexETFHead, normalize_features=True, scale=scale)


def head_features(head: nn.Module, features: Tensor) -> Tensor:
    """The features ``head``'s linear map reads: L2-normalised when the head normalises them."""
    if getattr(head, "normalize_features", False) is True:
        return F.normalize(features, dim=-1, eps=float(getattr(head, "eps", 1e-12)))
    return features


class CollapseModel(nn.Module):
    """``blocks`` -> ``neck`` -> ``head`` with timm's ``forward_features`` / ``forward_head``."""

    blocks: nn.Sequential
    neck: nn.Module
    head: nn.Module
    feature_dim: int
    num_classes: int

    def _build_neck(self, in_features: int, feature_dim: int, batchnorm: bool) -> None:
        layers: list[nn.Module] = [nn.Linear(in_features, feature_dim, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(feature_dim))
        self.neck = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, self.num_classes)

    def pool(self, x: Tensor) -> Tensor:
        """Turn the output of ``blocks`` into a vector per sample (default: flatten)."""
        return x.flatten(1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(N, feature_dim)``."""
        out: Tensor = self.neck(self.pool(self.blocks(x)))
        return out

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits, or with ``pre_logits=True`` the features the head's linear map reads."""
        if pre_logits:
            return head_features(self.head, features)
        logits: Tensor = self.head(features)
        return logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, head: nn.Module) -> None:
        """Replace the head by ``head`` (which reads ``feature_dim`` features)."""
        self.head = head


def _conv_block(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(cout),
        nn.ReLU(inplace=True),
    )


class CNN1d(CollapseModel):
    """A 1-D CNN for MNIST-1D: four conv blocks, flatten, linear neck, head.

    Args:
        in_channels: input channels (1 for MNIST-1D).
        length: input length (40 for MNIST-1D).
        num_classes: classes.
        width: channels of the first block (later blocks use ``2 * width``).
        feature_dim: penultimate feature dimension.
        neck_batchnorm: BatchNorm after the neck's linear layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        length: int = 40,
        num_classes: int = 10,
        *,
        width: int = 32,
        feature_dim: int = 32,
        neck_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.blocks = nn.Sequential(
            _conv_block(in_channels, width, 5, 1),
            _conv_block(width, width, 3, 2),
            _conv_block(width, 2 * width, 3, 2),
            _conv_block(2 * width, 2 * width, 3, 2),
        )
        with torch.no_grad():
            flat = self.blocks(torch.zeros(2, in_channels, length)).flatten(1).shape[1]
        self._build_neck(flat, feature_dim, neck_batchnorm)


class MLP(CollapseModel):
    """A ReLU MLP: ``depth`` blocks of Linear + BatchNorm + ReLU, linear neck, head.

    Args:
        in_features: flattened input size (40 for MNIST-1D).
        num_classes: classes.
        width: hidden units.
        depth: hidden blocks.
        feature_dim: penultimate feature dimension.
        neck_batchnorm: BatchNorm after the neck's linear layer.
    """

    def __init__(
        self,
        in_features: int = 40,
        num_classes: int = 10,
        *,
        width: int = 256,
        depth: int = 3,
        feature_dim: int = 32,
        neck_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        dims = [in_features] + [width] * depth
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True))
                for a, b in itertools.pairwise(dims)
            )
        )
        self._build_neck(width, feature_dim, neck_batchnorm)

    def forward_features(self, x: Tensor) -> Tensor:
        out: Tensor = self.neck(self.blocks(x.flatten(1)))
        return out


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet18(CollapseModel):
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool), global average pool, linear neck.

    ``blocks`` holds ``stem`` and the eight basic blocks ``layer1_0`` ... ``layer4_1``.

    Args:
        num_classes: classes.
        width: channels of the first stage (64 in the original).
        feature_dim: penultimate feature dimension.
        neck_batchnorm: BatchNorm after the neck's linear layer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        width: int = 64,
        feature_dim: int = 512,
        neck_batchnorm: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        stages["stem"] = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        cin = width
        for stage in range(4):
            cout = width * 2**stage
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                stages[f"layer{stage + 1}_{index}"] = BasicBlock(cin, cout, stride)
                cin = cout
        self.blocks = nn.Sequential(stages)
        self._build_neck(cin, feature_dim, neck_batchnorm)

    def pool(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


#: Display names of the models (for reports).
MODEL_NAMES = {"cnn": "1-D CNN", "mlp": "MLP", "resnet18": "ResNet-18"}

#: Default ``(width, feature_dim)`` of each model.
DEFAULT_SIZES = {"cnn": (32, 32), "mlp": (256, 32), "resnet18": (64, 512)}


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int | None = None,
    feature_dim: int | None = None,
    neck_batchnorm: bool = True,
    head: Callable[[int, int], nn.Module] | None = None,
) -> CollapseModel:
    """Build ``name`` (``cnn``, ``mlp`` or ``resnet18``) and optionally swap in ``head``.

    ``width`` and ``feature_dim`` default to :data:`DEFAULT_SIZES` (CNN 32/32, MLP 256/32,
    ResNet-18 64/512). ``head(in_features, num_classes)`` builds the classifier (default:
    ``nn.Linear``).
    """
    if name not in DEFAULT_SIZES:
        raise ValueError(
            f"Expected argument `model` to be one of cnn, mlp, resnet18, but got {name!r}."
        )
    default_width, default_dim = DEFAULT_SIZES[name]
    options: dict[str, Any] = {
        "neck_batchnorm": neck_batchnorm,
        "width": default_width if width is None else width,
        "feature_dim": default_dim if feature_dim is None else feature_dim,
    }
    model: CollapseModel
    if name == "cnn":
        model = CNN1d(input_shape[0], input_shape[-1], num_classes, **options)
    elif name == "mlp":
        model = MLP(int(torch.tensor(input_shape).prod()), num_classes, **options)
    else:
        model = ResNet18(num_classes, in_channels=input_shape[0], **options)
    if head is not None:
        model.reset_classifier(head(model.feature_dim, num_classes))
    return model
