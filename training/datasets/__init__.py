"""Datasets by name: `digits`, `delivery-eta`, and any user CSV."""

from __future__ import annotations

from pathlib import Path

from registry.errors import InvalidInput

from .base import CLASSIFICATION, REGRESSION, Dataset

BUILTIN = ("digits", "delivery-eta")


def load_dataset(
    name: str | None = None,
    *,
    csv: Path | None = None,
    target: str | None = None,
    task: str = "auto",
    drop_missing: bool = False,
) -> Dataset:
    """One entry point for the CLI and the federation: a built-in name, or a CSV + target."""
    if csv is not None:
        if name is not None:
            raise InvalidInput("give either --dataset or --csv, not both")
        if not target:
            raise InvalidInput("--csv needs --target COLUMN (the column to predict)")
        from .tabular import load_csv

        return load_csv(Path(csv), target, task=task, drop_missing=drop_missing)
    if target is not None:
        raise InvalidInput("--target only applies to --csv")
    if name == "digits":
        from .digits import load_digits

        return load_digits()
    if name == "delivery-eta":
        from .delivery_eta import load_delivery_eta

        return load_delivery_eta()
    if name is None:
        raise InvalidInput("choose a dataset: --dataset digits|delivery-eta, or --csv FILE --target COLUMN")
    raise InvalidInput(f"unknown dataset {name!r}; built in: {', '.join(BUILTIN)} (or --csv FILE --target COLUMN)")


__all__ = ["BUILTIN", "CLASSIFICATION", "REGRESSION", "Dataset", "load_dataset"]
