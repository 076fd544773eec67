"""Export end to end: write every format, verify it, and only then hand the files on
(to the store, or to a user's folder).

Three entry points:
- `export_version`: a stored version → new formats attached to it (one transaction).
- `export_for_publish`: the hook `pollinate train` uses, so a new version is published with
  its exports in the same step.
- `export_file`: a user's own `.keras` file → `DIR/tfjs/`, `DIR/tflite/<variant>.tflite`,
  `DIR/export-report.json` (+ `.md`), outside the store.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import InvalidInput, NotFound
from core.tensorflow import import_tensorflow
from registry import Store, VersionRecord

from .verify import report_markdown, verify_export

TFLITE_FORMATS = {"tflite-float32": "float32", "tflite-dynamic": "dynamic", "tflite-float16": "float16", "tflite-int8": "int8"}
ALL_FORMATS = ("tfjs-layers", *TFLITE_FORMATS, "tflite-train")
EVAL_LIMIT = 1000  # held-out rows verified per export: enough for the gates, quick in Node
RANDOM_SAMPLES = 256

Progress = Callable[[str], None]


class ExportRejected(InvalidInput):
    """A verification gate failed: nothing was published."""


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ALL_FORMATS
    tfjs_quantize: str | None = None  # None, "float16" or "uint8"
    int8_io: bool = False
    tfjs_backends: tuple[str, ...] = ("cpu", "wasm")
    latency_repeats: int = 50
    learning_rate: float = 1e-3  # the on-device optimizer's step (tflite-train)

    def check(self) -> None:
        unknown = [f for f in self.formats if f not in ALL_FORMATS]
        if unknown:
            raise InvalidInput(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(ALL_FORMATS)}")
        if not self.formats:
            raise InvalidInput("no export formats chosen")
        if self.tfjs_quantize not in (None, "float16", "uint8"):
            raise InvalidInput("--tfjs-quantize must be float16 or uint8")
        bad = [b for b in self.tfjs_backends if b not in ("cpu", "wasm")]
        if bad:
            raise InvalidInput(f"unknown TF.js backend(s) {', '.join(bad)}; use cpu, wasm")


@dataclass
class ExportResult:
    folders: dict[str, Path]  # format -> file or folder written
    report: dict
    markdown: str
    report_files: dict[str, Path] = field(default_factory=dict)

    def artifacts(self) -> dict[str, dict[str, Path]]:
        """{format: {file name: path}} as the store wants it; TFLite files become `model.tflite`."""
        out: dict[str, dict[str, Path]] = {}
        for fmt, path in self.folders.items():
            if path.is_dir():
                out[fmt] = {f.name: f for f in sorted(path.iterdir()) if f.is_file()}
            else:
                out[fmt] = {"model.tflite": path}
        out["export-report"] = dict(self.report_files)
        return out


def export_model(
    model,
    out_dir: Path,
    *,
    task: str,
    x_eval: np.ndarray,
    y_eval: np.ndarray | None,
    calibration: np.ndarray,
    options: ExportOptions,
    title: str,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the chosen formats into out_dir, verify them all, write the report.

    Raises ExportRejected (after writing the report) when a gate fails."""
    from . import tflite
    from .ondevice import write_training_tflite

    options.check()
    check_runtimes(options.formats)
    say = progress or (lambda message: None)
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}  # where the export's time goes, per stage
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock
        clock = now

    if "tfjs-layers" in options.formats:
        from .tfjs import check_tfjs_support

        check_tfjs_support(model)  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    if "tfjs-layers" in options.formats:
        from .tfjs import write_tfjs

        say("writing tfjs-layers")
        write_tfjs(model, out_dir / "tfjs", quantize=options.tfjs_quantize)
        folders["tfjs-layers"] = out_dir / "tfjs"
        lap("tfjs-layers")
    variants = [TFLITE_FORMATS[f] for f in options.formats if f in TFLITE_FORMATS]
    if variants:
        say("converting TFLite " + ", ".join(variants))
        written = tflite.write_tflite(model, out_dir / "tflite", variants, calibration=calibration, int8_io=options.int8_io)
        for fmt, variant in TFLITE_FORMATS.items():
            if variant in written:
                folders[fmt] = written[variant]
        lap("tflite")
    if "tflite-train" in options.formats:
        say("converting tflite-train (on-device training)")
        folders["tflite-train"] = write_training_tflite(
            model, out_dir / "tflite" / "train.tflite", task=task, learning_rate=options.learning_rate
        )
        lap("tflite-train")
    say("verifying")
    report = verify_export(
        model, folders, x_eval, y_eval, task=task, tfjs_quantized=options.tfjs_quantize is not None,
        tfjs_backends=options.tfjs_backends, latency_repeats=options.latency_repeats,
        progress=lambda what: say(f"verifying {what}"),
    )
    lap("verify")
    report["title"] = title
    report["seconds"] = seconds
    report["options"] = {"formats": list(options.formats), "tfjs_quantize": options.tfjs_quantize, "int8_io": options.int8_io}
    markdown = report_markdown(report, title=title)
    report_files = {"export-report.json": out_dir / "export-report.json", "export-report.md": out_dir / "export-report.md"}
    report_files["export-report.json"].write_text(json.dumps(report, indent=2) + "\n")
    report_files["export-report.md"].write_text(markdown)
    result = ExportResult(folders, report, markdown, report_files)
    if not report["passed"]:
        raise ExportRejected("export verification failed, nothing published: " + "; ".join(report["failures"]))
    return result


def _eval_arrays(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return dataset.x_test[:EVAL_LIMIT], dataset.y_test[:EVAL_LIMIT], dataset.x_train


def check_runtimes(formats) -> None:
    """Fail fast, before any training or conversion, when a chosen format cannot be verified
    here (TF.js needs Node and the TF.js runner): the error names the fix."""
    if any(f.startswith("tfjs") for f in formats):
        from .node_runner import check_runner

        check_runner()


def export_for_publish(options: ExportOptions | None = None, progress: Progress | None = None):
    """The `extra_artifacts` hook for training: export + verify before the version exists.
    Made before training starts, so a missing runtime is reported before minutes of work."""
    options = options or ExportOptions()
    check_runtimes(options.formats)

    def hook(model, dataset, scratch: Path) -> dict[str, dict[str, Path]]:
        x, y, calibration = _eval_arrays(dataset)
        result = export_model(model, scratch, task=dataset.task, x_eval=x, y_eval=y, calibration=calibration,
                              options=options, title=f"{dataset.name} (new version)", progress=progress)
        return result.artifacts()

    return hook


def export_version(
    store: Store,
    name: str,
    version: int | None = None,
    *,
    options: ExportOptions | None = None,
    progress: Progress | None = None,
) -> tuple[VersionRecord, dict]:
    """Export a stored version and attach the new formats to it (all or nothing)."""
    from training.datasets import reload_dataset
    from training.stored import load_keras_model

    options = options or ExportOptions()
    options.check()
    record = store.get_version(name, version)
    if "keras" not in record.artifacts:
        raise NotFound(f"{name} v{record.version} has no Keras model to export")
    present = [f for f in options.formats if f in record.artifacts]
    if present:
        raise InvalidInput(
            f"{name} v{record.version} already has {', '.join(present)}; versions are immutable "
            f"(choose other --formats, or export a new version)"
        )
    model = load_keras_model(store, name, record.version)
    dataset = reload_dataset(record.lineage.extra.get("data", {}), record.lineage.dataset_fingerprint)
    task = "classification" if record.labels else "regression"
    if dataset is not None:
        x, y, calibration = _eval_arrays(dataset)
    else:
        if progress:
            progress("the training data is not available: verifying on random inputs, gates against Keras itself")
        x = random_inputs(model, RANDOM_SAMPLES)
        y, calibration = None, x
    with tempfile.TemporaryDirectory(prefix="pollinate-export-") as scratch:
        result = export_model(model, Path(scratch), task=task, x_eval=x, y_eval=y, calibration=calibration,
                              options=options, title=f"{name} v{record.version}", progress=progress)
        updated = store.add_artifacts(name, record.version, result.artifacts())
    return updated, result.report


def random_inputs(model, count: int, seed: int = 0) -> np.ndarray:
    """Inputs for a model nobody gave samples for: uniform in [0, 1) in its input shape."""
    shape = [int(d) if d is not None else 1 for d in model.inputs[0].shape[1:]]
    return np.random.default_rng(seed).random((count, *shape), dtype=np.float32)


def infer_task(model, x: np.ndarray) -> str:
    """A softmax-looking output (rows of ≥ 2 non-negative values summing to 1) is a classifier."""
    y = np.asarray(model.predict(x[:32], verbose=0))
    if y.ndim == 2 and y.shape[1] >= 2 and (y >= 0).all() and np.allclose(y.sum(axis=1), 1.0, atol=1e-3):
        return "classification"
    return "regression"


def export_file(
    keras_path: Path,
    out_dir: Path,
    *,
    samples: Path | None = None,
    labels: Path | None = None,
    options: ExportOptions | None = None,
    progress: Progress | None = None,
) -> dict:
    """A user's `.keras` file → DIR/tfjs/, DIR/tflite/<variant>.tflite, DIR/export-report.json.

    Files appear in DIR only when every gate passed; on failure DIR gets just the report."""
    import_tensorflow()
    import keras

    options = options or ExportOptions()
    options.check()
    keras_path, out_dir = Path(keras_path), Path(out_dir)
    if not keras_path.is_file():
        raise InvalidInput(f"model file not found: {keras_path}")
    if keras_path.suffix not in (".keras", ".h5"):
        raise InvalidInput(f"{keras_path.name}: expected a Keras 3 .keras file (or legacy .h5)")
    try:
        model = keras.saving.load_model(keras_path)
    except Exception as exc:  # Keras raises many types for a bad file
        raise InvalidInput(f"cannot load {keras_path.name} as a Keras model: {str(exc).splitlines()[0]}") from exc
    if len(model.inputs) != 1:
        raise InvalidInput("export verification supports single-input models")
    if samples is not None:
        x = load_array(samples, "--samples").astype(np.float32)
        expected = tuple(int(d) for d in model.inputs[0].shape[1:] if d is not None)
        if tuple(x.shape[1:]) != expected:
            raise InvalidInput(f"--samples has shape {x.shape}; the model expects (N, {', '.join(map(str, expected))})")
    else:
        x = random_inputs(model, RANDOM_SAMPLES)
    y = load_array(labels, "--labels") if labels is not None else None
    if y is not None and len(y) != len(x):
        raise InvalidInput(f"--labels has {len(y)} rows, --samples has {len(x)}")
    task = infer_task(model, x)
    if "tfjs-layers" in options.formats:
        from .tfjs import check_tfjs_support

        check_tfjs_support(model)  # refuse before the output folder is even created
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pollinate-export-", dir=out_dir) as scratch:
        try:
            result = export_model(model, Path(scratch), task=task, x_eval=x[:EVAL_LIMIT],
                                  y_eval=None if y is None else y[:EVAL_LIMIT], calibration=x,
                                  options=options, title=keras_path.name, progress=progress)
        except ExportRejected:
            for name in ("export-report.json", "export-report.md"):
                if (Path(scratch) / name).exists():
                    shutil.copyfile(Path(scratch) / name, out_dir / name)
            raise
        for sub in ("tfjs", "tflite"):
            if (out_dir / sub).exists():
                shutil.rmtree(out_dir / sub)
            if (Path(scratch) / sub).exists():
                shutil.move(str(Path(scratch) / sub), out_dir / sub)
        for name, path in result.report_files.items():
            shutil.copyfile(path, out_dir / name)
    return result.report


def load_array(path: Path, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InvalidInput(f"{what}: {path.name} is not a .npy array ({exc})") from None
