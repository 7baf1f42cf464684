"""Smoke demo: checks that the installation imports and trains a tiny classifier on CPU.

Run: ``python recipes/smoke.py --out runs/smoke``. The generalization recipe replaces this as the
main demo once it lands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import torchcollapse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/smoke"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    num_classes, dim, per_class = 4, 8, 64
    centres = 3 * torch.randn(num_classes, dim, generator=generator)
    target = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[target] + torch.randn(len(target), dim, generator=generator)

    model = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(features), target)
        loss.backward()
        optimizer.step()
    acc = (model(features).argmax(1) == target).float().mean().item()

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"version": torchcollapse.__version__, "torch": torch.__version__, "accuracy": acc}
    (args.out / "smoke.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
