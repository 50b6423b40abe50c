"""Train the bundled demo models ``digits-relu`` and ``digits-tanh``.

Both are 64-32-32-10 MLPs (see ``rj_plugin.models.build_mlp``) trained with Adam on the
scikit-learn 8x8 digits (pixels scaled to [0, 1], stratified 80/20 split of
``rj_plugin.data.load_digits_split``).  Writes ``rj_plugin/models/digits_{relu,tanh}.pt`` as
``{"arch", "state_dict", "test_accuracy", "trained_by", "seed"}``.  Takes a few seconds on CPU.

Usage: ``python scripts/train_digits.py [--out-dir DIR] [--epochs N]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from rj_plugin.data import load_digits_split
from rj_plugin.models import build_mlp

SEED = 0
HIDDEN = [32, 32]
MODELS = {"relu": "digits_relu.pt", "tanh": "digits_tanh.pt"}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "rj_plugin" / "models"


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``x: [N, 64]`` with labels ``y: [N]``."""
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).double().mean())


def train(activation: str, epochs: int, seed: int = SEED) -> tuple[nn.Sequential, dict, float]:
    """Train one 64-32-32-10 MLP; return ``(model, arch, test_accuracy)``."""
    torch.manual_seed(seed)
    x_train, y_train = load_digits_split("train", dtype=torch.float32)
    x_test, y_test = load_digits_split("test", dtype=torch.float32)
    arch = {
        "in_features": 64,
        "hidden": list(HIDDEN),
        "out_features": 10,
        "activation": activation,
        "input_shape": [64],
    }
    model = build_mlp(64, HIDDEN, 10, activation)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()
    return model, arch, accuracy(model, x_test, y_test)


def main(argv: list[str] | None = None) -> None:
    """Train both demo models and write them to ``--out-dir``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # reproducible and fast enough for such small nets
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for activation, filename in MODELS.items():
        model, arch, acc = train(activation, args.epochs)
        payload = {
            "arch": arch,
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "test_accuracy": acc,
            "trained_by": "scripts/train_digits.py",
            "seed": SEED,
        }
        path = args.out_dir / filename
        torch.save(payload, path)
        print(f"digits-{activation}: test accuracy {acc:.4f} -> {path}")


if __name__ == "__main__":
    main()
