"""Shared helpers for the recipes: data, models, the training loop, evaluation, outputs, config.

Every study in ``recipes/`` is one script built from these small modules:

- :mod:`harness.config`: one typed ``@dataclass`` per recipe turned into command-line flags, with
  ``--preset NAME`` and ``--config file.json``; the resolved config is saved as ``config.json``.
- :mod:`harness.data`: MNIST-1D generated offline by the ``mnist1d`` package and cached on disk;
  CIFAR-10/100 read from the python-pickle folder; a sharded batch sampler for ``torchrun``.
- :mod:`harness.models`: an MLP and a 1-D CNN for MNIST-1D and a CIFAR ResNet-18, all exposing
  ``forward_features`` / ``forward_head`` (timm style) so that heads and trackers plug in.
- :mod:`harness.train`: the loop (SGD or AdamW, schedules, AMP on GPU, DDP, checkpoint each epoch,
  ``--resume``, seeds).
- :mod:`harness.evaluate`: accuracy, nearest-class-centre accuracy and the neural collapse metrics
  (Papyan, Han & Donoho, 2020) on train and test features.
- :mod:`harness.outputs`: per-epoch CSV, PNG plots, and ``report.md`` with the final table.

Scripts run as ``python recipes/<study>.py``, which puts ``recipes/`` on ``sys.path`` so that
``from harness import ...`` works; the tests import the same way.
"""

from __future__ import annotations

__all__: list[str] = []
