"""Stores the federation tests start from: a weak digits MLP, trained centrally in seconds,
that honest rounds can still improve."""

from __future__ import annotations

from pathlib import Path


def weak_digits_store(home: Path, width: int) -> Path:
    """`home` with digits v1: an MLP of `width` units trained 3 epochs (about 0.7 accuracy)."""
    from registry import Store
    from training.central import TrainSettings, train_and_register
    from training.datasets import load_dataset

    train_and_register(Store(home), load_dataset("digits"), TrainSettings(model="mlp", epochs=3, width=width))
    return home
