"""Small datasets for demos and tests (no download: scikit-learn ships them)."""

from __future__ import annotations

import torch

from rj_plugin.errors import ConfigError

__all__ = ["DIGITS_SEED", "load_digits_split"]

#: Seed of the stratified 80/20 train/test split used by ``scripts/train_digits.py``.
DIGITS_SEED = 0


def load_digits_split(
    split: str = "test", dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scikit-learn 8x8 digits, split 80/20 (stratified, seed ``DIGITS_SEED``).

    Returns ``X: [N, 64]`` of ``dtype`` with pixel values scaled to [0, 1] (divided by 16), and
    ``y: [N]`` (long, classes 0..9).  ``split`` is ``"train"`` (N = 1437), ``"test"`` (N = 360)
    or ``"all"`` (N = 1797, the original order).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ConfigError(f"unknown digits split {split!r}; expected 'train', 'test' or 'all'")
    data = load_digits()
    x = data.data / 16.0
    y = data.target
    if split != "all":
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, stratify=y, random_state=DIGITS_SEED
        )
        x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=torch.long)
