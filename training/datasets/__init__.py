"""Datasets by name: `digits`, `delivery-eta`, and any user CSV."""

from __future__ import annotations

from pathlib import Path

from core.errors import InvalidInput

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

        dataset = load_csv(Path(csv), target, task=task, drop_missing=drop_missing)
        dataset.recipe = {"csv": str(Path(csv).resolve()), "target": target, "task": task, "drop_missing": drop_missing}
        return dataset
    if target is not None:
        raise InvalidInput("--target only applies to --csv")
    if name == "digits":
        from .digits import load_digits

        dataset = load_digits()
    elif name == "delivery-eta":
        from .delivery_eta import load_delivery_eta

        dataset = load_delivery_eta()
    else:
        dataset = None
    if dataset is not None:
        dataset.recipe = {"dataset": name}
        return dataset
    if name is None:
        raise InvalidInput("choose a dataset: --dataset digits|delivery-eta, or --csv FILE --target COLUMN")
    raise InvalidInput(f"unknown dataset {name!r}; built in: {', '.join(BUILTIN)} (or --csv FILE --target COLUMN)")


def reload_dataset(recipe: dict, fingerprint: str | None = None) -> Dataset | None:
    """The dataset a version was trained on, rebuilt from its lineage's recipe; None when it
    cannot be had any more (a CSV that moved or changed: the fingerprint tells)."""
    if not recipe:
        return None
    try:
        if "csv" in recipe:
            dataset = load_dataset(csv=Path(recipe["csv"]), target=recipe.get("target"),
                                   task=recipe.get("task", "auto"), drop_missing=recipe.get("drop_missing", False))
        else:
            dataset = load_dataset(recipe.get("dataset"))
    except InvalidInput:
        return None
    if fingerprint and dataset.fingerprint() != fingerprint:
        return None
    return dataset


__all__ = ["BUILTIN", "CLASSIFICATION", "REGRESSION", "Dataset", "load_dataset", "reload_dataset"]
