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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from core.errors import InvalidInput, NotFound
from core.tensorflow import import_tensorflow
from registry import Store, VersionRecord

from .verify import report_markdown, verify_export

TFLITE_FORMATS = {"tflite-float32": "float32", "tflite-dynamic": "dynamic", "tflite-float16": "float16", "tflite-int8": "int8"}
ALL_FORMATS = ("tfjs-layers", *TFLITE_FORMATS, "tflite-train")  # the default
# TF.js formats beyond the LayersModel: made through `export.tfjs.write_tfjs_any` when that exists
TFJS_QUANTIZED = {"tfjs-float16": "float16", "tfjs-uint8": "uint8"}
TFJS_FOLDERS = {"tfjs-layers": "tfjs", "tfjs-graph": "tfjs-graph", "tfjs-float16": "tfjs-float16", "tfjs-uint8": "tfjs-uint8"}
KNOWN_FORMATS = ("tfjs-layers", "tfjs-graph", *TFJS_QUANTIZED, *TFLITE_FORMATS, "tflite-train")
EVAL_LIMIT = 1000  # held-out rows verified per export: enough for the gates, quick in Node
RANDOM_SAMPLES = 256

Progress = Callable[[str], None]


class ExportRejected(InvalidInput):
    """No format could be delivered (or, with `strict`, at least one could not): nothing was
    published. `report` is the export report (with its `outcome`) when one was made."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


# `pollinate export` exit codes: what was delivered (bad input stays 2, like every command)
EXIT_ALL, EXIT_SOME, EXIT_NONE = 0, 3, 4


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ALL_FORMATS
    tfjs_quantize: str | None = None  # None, "float16" or "uint8"
    int8_io: bool = False
    tfjs_backends: tuple[str, ...] = ("cpu", "wasm")
    latency_repeats: int = 50
    learning_rate: float = 1e-3  # the on-device optimizer's step (tflite-train)
    strict: bool = False  # all or nothing: one refused format refuses the export
    # a model tfjs-layers cannot express (a GRU with reset_after=True, attention) gets a TF.js
    # graph model instead, when tfjs-graph was not asked for. On for the default formats
    # (`pollinate export` without --formats, `pollinate train`); explicit formats are exact.
    tfjs_graph_fallback: bool = False

    def check(self) -> None:
        unknown = [f for f in self.formats if f not in KNOWN_FORMATS]
        if unknown:
            raise InvalidInput(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_FORMATS)}")
        if not self.formats:
            raise InvalidInput("no export formats chosen")
        if self.tfjs_quantize not in (None, "float16", "uint8"):
            raise InvalidInput("--tfjs-quantize must be float16 or uint8")
        bad = [b for b in self.tfjs_backends if b not in ("cpu", "wasm")]
        if bad:
            raise InvalidInput(f"unknown TF.js backend(s) {', '.join(bad)}; use cpu, wasm")


@dataclass
class ExportResult:
    folders: dict[str, Path]  # format -> file or folder written, delivered formats only
    report: dict
    markdown: str
    report_files: dict[str, Path] = field(default_factory=dict)

    @property
    def outcome(self) -> dict:
        return self.report["outcome"]

    def artifacts(self) -> dict[str, dict[str, Path]]:
        """{format: {file name: path}} as the store wants it (verified formats only, plus the
        export report with the refusals); TFLite files become `model.tflite`."""
        out: dict[str, dict[str, Path]] = {}
        for fmt, path in self.folders.items():
            if path.is_dir():
                out[fmt] = {f.name: f for f in sorted(path.iterdir()) if f.is_file()}
            else:
                out[fmt] = {"model.tflite": path}
        out["export-report"] = dict(self.report_files)
        return out


def _graph_models_available() -> bool:
    from . import tfjs

    return hasattr(tfjs, "write_tfjs_any")


def outcome_status(delivered, requested) -> str:
    return "all" if len(delivered) == len(requested) else "some" if delivered else "none"


def exit_code(outcome: dict) -> int:
    """`pollinate export`'s exit code for an outcome: 0 all, 3 some, 4 none."""
    return {"all": EXIT_ALL, "some": EXIT_SOME, "none": EXIT_NONE}[outcome["status"]]


def _tfjs_writer(fmt: str, options: ExportOptions):
    """The function writing one TF.js format into a folder (raises naming the layer/op).

    `tfjs-layers` is always a LayersModel and `tfjs-graph` a graph model; the weight-quantized
    `tfjs-float16` / `tfjs-uint8` are whichever kind `write_tfjs_any` can make (layers first)."""
    from . import tfjs

    write_any = getattr(tfjs, "write_tfjs_any", None)
    if fmt == "tfjs-layers":
        if write_any is None:
            return lambda model, folder: tfjs.write_tfjs(model, folder, quantize=options.tfjs_quantize)
        return lambda model, folder: write_any(model, folder, quantize=options.tfjs_quantize, kind="layers")
    if write_any is None:
        raise InvalidInput(f"{fmt} is not available in this version of the TF.js exporter")
    if fmt == "tfjs-graph":
        return lambda model, folder: write_any(model, folder, quantize=options.tfjs_quantize, kind="graph")
    return lambda model, folder: write_any(model, folder, quantize=TFJS_QUANTIZED[fmt])


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
    """Write the chosen formats into out_dir, each made and verified on its own, and the report.

    A format that cannot be made or fails its gate is refused (its files removed, the reason
    in `report["outcome"]["refused"]`); the others are delivered. Raises ExportRejected (after
    writing the report, which the exception carries) only when nothing was delivered, or when
    `options.strict` and anything was refused."""
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

    requested = list(dict.fromkeys(options.formats))
    out_dir.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    refused: dict[str, dict] = {}
    make_seconds: dict[str, float] = {}  # per format: the time to write it (verification is per row)

    def refuse(fmt: str, stage: str, error) -> None:
        from .tflite import first_line

        reason = error if isinstance(error, str) else first_line(error)
        refused[fmt] = {"stage": stage, "reason": reason}
        say(f"{fmt} refused: {reason}")

    def write_tfjs_format(fmt: str) -> None:
        folder = out_dir / TFJS_FOLDERS[fmt]
        say(f"writing {fmt}")
        try:
            _tfjs_writer(fmt, options)(model, folder)
            folders[fmt] = folder
        except Exception as exc:  # UnsupportedLayer names the layer; anything else is a refusal too
            shutil.rmtree(folder, ignore_errors=True)
            refuse(fmt, "convert", exc)
        make_seconds[fmt] = time.perf_counter() - clock
        lap(fmt)

    for fmt in [f for f in requested if f.startswith("tfjs")]:
        write_tfjs_format(fmt)
        if (fmt == "tfjs-layers" and fmt in refused and options.tfjs_graph_fallback and "tfjs-graph" not in requested
                and _graph_models_available()):
            requested.insert(requested.index(fmt) + 1, "tfjs-graph")  # reported like any requested format
            write_tfjs_format("tfjs-graph")
    variants = [TFLITE_FORMATS[f] for f in requested if f in TFLITE_FORMATS]
    if variants:
        say("converting TFLite " + ", ".join(variants))
        variant_seconds: dict[str, float] = {}
        written, failed = tflite.write_tflite_each(model, out_dir / "tflite", variants, calibration=calibration,
                                                   int8_io=options.int8_io, seconds=variant_seconds)
        make_seconds.update({fmt: variant_seconds[v] for fmt, v in TFLITE_FORMATS.items() if v in variant_seconds})
        for fmt, variant in TFLITE_FORMATS.items():
            if variant in written:
                folders[fmt] = written[variant]
            elif variant in failed:
                refuse(fmt, "convert", failed[variant])
        lap("tflite")
    if "tflite-train" in requested:
        say("converting tflite-train (on-device training)")
        try:
            folders["tflite-train"] = write_training_tflite(
                model, out_dir / "tflite" / "train.tflite", task=task, learning_rate=options.learning_rate
            )
        except Exception as exc:
            refuse("tflite-train", "convert", exc)
        make_seconds["tflite-train"] = time.perf_counter() - clock
        lap("tflite-train")
    say("verifying")
    quantized = tuple(f for f in TFJS_QUANTIZED if f in folders)
    if options.tfjs_quantize and "tfjs-layers" in folders:
        quantized += ("tfjs-layers",)
    report = verify_export(
        model, {f: folders[f] for f in requested if f in folders}, x_eval, y_eval, task=task,
        tfjs_quantized=options.tfjs_quantize is not None, quantized_formats=quantized,
        tfjs_backends=options.tfjs_backends, latency_repeats=options.latency_repeats,
        progress=lambda what: say(f"verifying {what}"),
    )
    lap("verify")
    for fmt, why in report.pop("refused").items():
        refuse(fmt, "verify", why)
    backend_gaps = report.pop("backend_gaps", {})
    for fmt in refused:  # only verified files are handed on
        path = folders.pop(fmt, None)
        if path is not None and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path is not None:
            path.unlink(missing_ok=True)
    delivered = [f for f in requested if f in folders]
    report["outcome"] = {
        "status": outcome_status(delivered, requested),
        "requested": requested,
        "delivered": delivered,
        "refused": {f: refused[f] for f in requested if f in refused},
        "backend_gaps": {f: backend_gaps[f] for f in delivered if f in backend_gaps},
        "strict": options.strict,
    }
    report["failures"] = [f"{f}: {why['reason']}" for f, why in report["outcome"]["refused"].items()]
    report["passed"] = not refused
    report["title"] = title
    report["seconds"] = seconds
    report["make_seconds"] = make_seconds
    report["options"] = {"formats": requested, "tfjs_quantize": options.tfjs_quantize, "int8_io": options.int8_io,
                         "strict": options.strict}
    if options.strict and refused:
        report["outcome"].update(status="none", delivered=[])
    markdown = report_markdown(report, title=title)
    report_files = {"export-report.json": out_dir / "export-report.json", "export-report.md": out_dir / "export-report.md"}
    report_files["export-report.json"].write_text(json.dumps(report, indent=2) + "\n")
    report_files["export-report.md"].write_text(markdown)
    if options.strict and refused:
        raise ExportRejected("--strict: export refused, nothing published: " + "; ".join(report["failures"]), report)
    if not delivered:
        raise ExportRejected("no format passed, nothing published: " + "; ".join(report["failures"]), report)
    return ExportResult(folders, report, markdown, report_files)


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
    options = options or ExportOptions(tfjs_graph_fallback=True)
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
    """Export a stored version and attach the formats that passed (with the export report,
    which names the refused ones); ExportRejected, and nothing attached, when none passed
    (or, with `strict`, when any was refused)."""
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
    if "tfjs-graph" in record.artifacts:  # a fallback would collide with the attached one
        options = replace(options, tfjs_graph_fallback=False)
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
        artifacts = result.artifacts()
        artifacts[report_format(record.artifacts)] = artifacts.pop("export-report")
        updated = store.add_artifacts(name, record.version, artifacts)
    return updated, result.report


def report_format(attached) -> str:
    """`export-report` for a version's first export; a later export of more formats (one that
    was refused before, say) attaches its report as `export-report-2`, `-3`, …"""
    if "export-report" not in attached:
        return "export-report"
    n = 2
    while f"export-report-{n}" in attached:
        n += 1
    return f"export-report-{n}"


def version_outcome(store: Store, record: VersionRecord) -> dict:
    """What a stored version has: delivered formats, refused ones with the reason, TF.js kinds
    (see `registry.cli.export_outcome`, which `pollinate models show` prints)."""
    from registry.outcome import export_outcome

    return export_outcome(store, record)


def random_inputs(model, count: int, seed: int = 0) -> np.ndarray:
    """Inputs for a model nobody gave samples for: uniform in [0, 1) in its input shape, or,
    for an integer input (token ids), ids below the smallest Embedding's vocabulary."""
    from .tflite import input_dtype

    shape = [int(d) if d is not None else 1 for d in model.inputs[0].shape[1:]]
    rng = np.random.default_rng(seed)
    dtype = input_dtype(model)
    if np.issubdtype(dtype, np.integer):
        vocab = [int(layer.input_dim) for layer in _all_layers(model) if hasattr(layer, "input_dim")]
        return rng.integers(0, min(vocab) if vocab else 2, (count, *shape)).astype(dtype)
    return rng.random((count, *shape), dtype=np.float32)


def _all_layers(model):
    for layer in getattr(model, "layers", []) or []:
        yield layer
        yield from _all_layers(layer)


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
    code: Path | None = None,
) -> dict:
    """A user's `.keras` file → DIR/tfjs/, DIR/tflite/<variant>.tflite, DIR/export-report.json.

    `code` is a Python file defining the model's own classes (custom layers, a subclassed
    model, registered with `@keras.saving.register_keras_serializable`): imported first, as
    the user's training script was, so that Keras can rebuild them.

    Only verified formats appear in DIR (refusals and their reasons are in the report); when
    none passed (or one was refused under `strict`) DIR gets just the report and
    ExportRejected is raised."""
    import_tensorflow()
    import keras

    options = options or ExportOptions()
    options.check()
    keras_path, out_dir = Path(keras_path), Path(out_dir)
    if not keras_path.is_file():
        raise InvalidInput(f"model file not found: {keras_path}")
    if keras_path.suffix not in (".keras", ".h5"):
        raise InvalidInput(f"{keras_path.name}: expected a Keras 3 .keras file (or legacy .h5)")
    if code is not None:
        import_user_code(code)
    try:
        model = keras.saving.load_model(keras_path)
    except Exception as exc:  # Keras raises many types for a bad file
        raise InvalidInput(load_error(keras_path, exc, code)) from exc
    model = with_graph(model)
    check_single_io(model)
    from .tflite import as_input, input_dtype

    if samples is not None:
        x = as_input(load_array(samples, "--samples"), input_dtype(model))
        expected = tuple(int(d) for d in model.inputs[0].shape[1:] if d is not None)
        if tuple(x.shape[1:]) != expected:
            raise InvalidInput(f"--samples has shape {x.shape}; the model expects (N, {', '.join(map(str, expected))})")
    else:
        x = random_inputs(model, RANDOM_SAMPLES)
    y = load_array(labels, "--labels") if labels is not None else None
    if y is not None and len(y) != len(x):
        raise InvalidInput(f"--labels has {len(y)} rows, --samples has {len(x)}")
    task = infer_task(model, x)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pollinate-export-", dir=out_dir) as scratch:
        try:
            result = export_model(model, Path(scratch), task=task, x_eval=x[:EVAL_LIMIT],
                                  y_eval=None if y is None else y[:EVAL_LIMIT], calibration=x,
                                  options=options, title=keras_path.name, progress=progress)
        except ExportRejected:  # none delivered (or --strict and one refused): DIR gets just the report
            _copy_reports(Path(scratch), out_dir)
            raise
        for sub in ("tflite", *TFJS_FOLDERS.values()):
            if (out_dir / sub).exists():
                shutil.rmtree(out_dir / sub)
            if (Path(scratch) / sub).exists() and any((Path(scratch) / sub).iterdir()):
                shutil.move(str(Path(scratch) / sub), out_dir / sub)
        _copy_reports(Path(scratch), out_dir)
    return result.report


def import_user_code(path: Path) -> None:
    """Run a user's Python file (its classes register themselves with Keras as it is imported)."""
    import importlib.util
    import sys

    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise InvalidInput(f"--code: {path} is not a Python file")
    name = f"pollinate_user_code_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any error, reported in one line
        sys.modules.pop(name, None)
        raise InvalidInput(f"--code {path.name} failed to import: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc


def load_error(keras_path: Path, exc: BaseException, code: Path | None) -> str:
    """One line for a .keras file Keras cannot load. Keras' own message for a custom class it
    does not know spans the class's whole config; this names the class and the fix."""
    import re

    text = str(exc).strip()
    missing = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    custom = missing or "could not be deserialized properly" in text
    if custom:
        what = f"its custom class {missing.group(1)!r}" if missing else "a custom layer or model class"
        hint = ("--code did not define it (register it with @keras.saving.register_keras_serializable)" if code is not None
                else "pass the Python file that defines it (registered with @keras.saving.register_keras_serializable) "
                     "with --code FILE.py")
        return f"cannot load {keras_path.name}: Keras cannot rebuild {what}; {hint}"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"cannot load {keras_path.name} as a Keras model: {first[:300]}"


def with_graph(model):
    """A subclassed model (its own `call`, no layer graph: `model.inputs` is unset after loading)
    wrapped as `keras.Model(Input, model(Input))` over the input shape it was built with, so
    every exporter sees one input and one output; the wrapper shares the model's weights.
    Any other model, or one whose build shape is unknown, is returned as is."""
    import keras

    try:
        if list(model.inputs or []):
            return model
    except (AttributeError, ValueError):
        pass
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if len(shapes) != 1:
        return model
    shape = next(iter(shapes.values()))
    if not isinstance(shape, (tuple, list)) or len(shape) < 2 or not all(isinstance(d, int) or d is None for d in shape):
        return model
    inputs = keras.Input(tuple(shape[1:]), name="input")
    try:
        return keras.Model(inputs, model(inputs), name=model.name)
    except Exception:  # a call that cannot be traced symbolically: reported by check_single_io
        return model


def check_single_io(model) -> None:
    """Verification feeds one array and compares one output: name what else a model has."""
    def names(tensors) -> str:
        history = [getattr(t, "_keras_history", None) for t in tensors]
        return ", ".join(getattr(getattr(h, "operation", None), "name", None) or getattr(t, "name", "?")
                         for h, t in zip(history, tensors))

    inputs = list(getattr(model, "inputs", None) or [])
    outputs = list(getattr(model, "outputs", None) or [])
    if len(inputs) > 1:
        raise InvalidInput(f"the model takes {len(inputs)} inputs ({names(inputs)}); export verification supports "
                           "single-input models (concatenate the inputs into one, or export each branch)")
    if len(outputs) > 1:
        raise InvalidInput(f"the model has {len(outputs)} outputs ({names(outputs)}); export verification supports "
                           "single-output models (export one model per output, or concatenate them)")
    if not inputs:
        raise InvalidInput("the model has no defined input (a subclassed model never called on data): "
                           "build it with keras.Input or call it once before saving")


def _copy_reports(scratch: Path, out_dir: Path) -> None:
    for name in ("export-report.json", "export-report.md"):
        if (scratch / name).exists():
            shutil.copyfile(scratch / name, out_dir / name)


def load_array(path: Path, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InvalidInput(f"{what}: {path.name} is not a .npy array ({exc})") from None
