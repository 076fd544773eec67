"""Central training: fit a zoo model on a dataset, evaluate it, and register it as a version.

Called by `pollinate train` and `pollinate demo`. The version's files are the Keras model and
its evaluation report (JSON + plots); everything is written to a scratch folder first and
published to the store in one step, so a crash leaves no half-registered version.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.errors import InvalidInput
from core.tensorflow import import_tensorflow
from registry import Lineage, Store, VersionRecord
from registry.store import check_model_name

from . import plots
from .datasets import CLASSIFICATION, Dataset
from .report import evaluate_predictions, headline_metrics

EpochCallback = Callable[[int, int, dict], None]  # (epoch finished, total epochs, logs)
# Extra files to publish with the version, made from the trained model before it is published
# (the exporter, injected by the CLI layer so that training does not import export/):
# (model, dataset, scratch folder) -> {format: {file name: path}}
ArtifactHook = Callable[[object, Dataset, Path], dict[str, dict[str, Path]]]


@dataclass
class TrainSettings:
    model: str = "cnn"
    epochs: int = 15
    seed: int = 0
    batch_size: int = 32
    learning_rate: float | None = None  # None: the zoo model's own default
    width: int | None = None

    def __post_init__(self) -> None:
        from .zoo import zoo_entry

        if self.learning_rate is None:
            self.learning_rate = zoo_entry(self.model).learning_rate

    def check(self) -> None:
        if self.epochs < 1:
            raise InvalidInput("--epochs must be at least 1")
        if self.batch_size < 1:
            raise InvalidInput("--batch-size must be at least 1")
        if not (0 < self.learning_rate < 10):
            raise InvalidInput("--learning-rate must be in (0, 10)")

    def hyperparameters(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class TrainOutcome:
    record: VersionRecord
    evaluation: dict
    history: dict[str, list[float]]
    train_seconds: float
    parameters: int
    dataset: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "model": self.record.model,
            "version": self.record.version,
            "dataset": self.dataset,
            "parameters": self.parameters,
            "train_seconds": round(self.train_seconds, 2),
            "metrics": self.record.metrics,
            "baseline": self.evaluation["baseline"],
            "artifacts": {fmt: [f.name for f in files] for fmt, files in self.record.artifacts.items()},
        }


def compile_model(model, dataset: Dataset, learning_rate: float) -> None:
    import keras

    if dataset.task == CLASSIFICATION:
        loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    else:
        loss, metrics = "mse", ["mae"]
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)


def seed_everything(seed: int) -> None:
    """Same seed, same weights: seeds Python, numpy and TF, and makes TF's kernels deterministic."""
    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def fit(dataset: Dataset, settings: TrainSettings, on_epoch: EpochCallback | None = None):
    """Build and train the zoo model; returns (model, history)."""
    import_tensorflow()
    import keras

    from .zoo import build_model

    settings.check()
    seed_everything(settings.seed)
    model = build_model(settings.model, dataset, width=settings.width)
    compile_model(model, dataset, settings.learning_rate)

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if on_epoch:
                on_epoch(epoch + 1, settings.epochs, {k: float(v) for k, v in (logs or {}).items()})

    history = model.fit(
        dataset.x_train,
        dataset.y_train,
        validation_data=(dataset.x_val, dataset.y_val),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[Progress()],
    )
    return model, {k: [float(v) for v in values] for k, values in history.history.items()}


def predict(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=256, verbose=0))


# The reference profile is computed on at most this many training rows (a fixed subsample):
# decile edges and reference shares are stable well below it, and registration stays fast.
PROFILE_ROWS = 2000


def profile_artifact(model, dataset: Dataset) -> dict[str, dict[str, bytes]]:
    """The version's `profile` artifact (docs/monitoring.md section 1): the monitoring grid
    and the reference counts of the training inputs and the model's predictions on them."""
    from registry.profile import PROFILE_FILE, PROFILE_FORMAT, build_profile

    x, y = dataset.x_train, dataset.y_train
    if len(x) > PROFILE_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(len(x), PROFILE_ROWS, replace=False))
        x, y = x[rows], y[rows]
    outputs = predict(model, x)
    targets = y if dataset.task != CLASSIFICATION else None
    profile = build_profile(x, outputs, dataset.input_spec(), dataset.labels, dataset.task, targets=targets)
    return {PROFILE_FORMAT: {PROFILE_FILE: json.dumps(profile, sort_keys=True).encode()}}


def attach_profile(store: Store, name: str, version: int | None = None) -> VersionRecord:
    """`pollinate models profile NAME[@V]`: attach a profile to a version registered without
    one, from its Keras model and its training data rebuilt from the lineage's recipe."""
    from registry.profile import PROFILE_FORMAT

    from .datasets import reload_dataset
    from .stored import load_keras_model

    record = store.get_version(name, version)
    if PROFILE_FORMAT in record.artifacts:
        raise InvalidInput(f"{name} v{record.version} already has a profile (attached artifacts are immutable)")
    if "keras" not in record.artifacts:
        raise InvalidInput(f"{name} v{record.version} has no Keras model to compute its predictions with")
    dataset = reload_dataset(record.lineage.extra.get("data", {}), record.lineage.dataset_fingerprint)
    if dataset is None:
        raise InvalidInput(f"the training data of {name} v{record.version} is not available any more"
                           " (its dataset recipe cannot be rebuilt, or its fingerprint changed)")
    model = load_keras_model(store, name, record.version)
    return store.add_artifacts(name, record.version, profile_artifact(model, dataset))


def write_report(folder: Path, dataset: Dataset, evaluation: dict, history: dict, extra: dict, predictions: np.ndarray) -> dict[str, Path]:
    """report.json and its plots, in `folder`; returns {file name: path}."""
    title = f"{dataset.name}"
    files = {"report.json": folder / "report.json"}
    report = {"dataset": dataset.summary(), "history": history, **extra, **evaluation}
    files["report.json"].write_text(json.dumps(report, indent=2, sort_keys=True))
    if history:
        files["learning_curves.png"] = plots.learning_curves(history, folder / "learning_curves.png", title=f"{title}: learning curves")
    test = evaluation["test"]
    if dataset.task == CLASSIFICATION:
        files["confusion_matrix.png"] = plots.confusion_matrix(
            test["confusion_matrix"], dataset.labels, folder / "confusion_matrix.png", title=f"{title}: test confusion matrix")
        files["calibration.png"] = plots.reliability(test["calibration"], folder / "calibration.png", title=f"{title}: reliability")
    else:
        files["predicted_vs_actual.png"] = plots.predicted_vs_actual(
            dataset.y_test, predictions, folder / "predicted_vs_actual.png", title=f"{title}: test set", unit=dataset.target or "")
        files["calibration.png"] = plots.reliability(
            test["calibration"], folder / "calibration.png", title=f"{title}: binned predictions", regression=True)
    return files


def train_and_register(
    store: Store,
    dataset: Dataset,
    settings: TrainSettings,
    *,
    name: str | None = None,
    on_epoch: EpochCallback | None = None,
    extra_artifacts: ArtifactHook | None = None,
) -> TrainOutcome:
    """Train, evaluate on the test split, and publish model + report (+ whatever
    `extra_artifacts` makes, e.g. the exported formats) as the next version, in one step."""
    model_name = name or dataset.name
    check_model_name(model_name)  # refuse a bad name before spending minutes training
    started = time.perf_counter()
    model, history = fit(dataset, settings, on_epoch)
    train_seconds = time.perf_counter() - started
    predictions = predict(model, dataset.x_test)
    evaluation = evaluate_predictions(dataset, predictions)
    parameters = int(model.count_params())
    with tempfile.TemporaryDirectory(prefix="pollinate-train-") as scratch:
        scratch = Path(scratch)
        model_path = scratch / "model.keras"
        model.save(model_path)
        extra = {
            "model": {"zoo": settings.model, "parameters": parameters},
            "hyperparameters": settings.hyperparameters(),
            "train_seconds": train_seconds,
        }
        report_files = write_report(scratch, dataset, evaluation, history, extra, predictions)
        artifacts = {"keras": {"model.keras": model_path}, "report": report_files,
                     **profile_artifact(model, dataset)}
        if extra_artifacts is not None:
            artifacts.update(extra_artifacts(model, dataset, scratch / "extra"))
        record = store.publish(
            model_name,
            lineage=Lineage(
                source="central",
                dataset_fingerprint=dataset.fingerprint(),
                hyperparameters=settings.hyperparameters(),
                extra={"dataset": dataset.name, "data": dataset.recipe, "zoo_model": settings.model},
            ),
            artifacts=artifacts,
            metrics=headline_metrics(evaluation),
            input_spec=dataset.input_spec(),
            labels=dataset.labels,
        )
    return TrainOutcome(record, evaluation, history, train_seconds, parameters, dataset.summary())
