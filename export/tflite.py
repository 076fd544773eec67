"""Keras 3 → TFLite, in the four inference variants phones and devices use.

| variant   | weights            | activations | for                                  |
|-----------|--------------------|-------------|--------------------------------------|
| `float32` | float32            | float32     | reference; exact                     |
| `dynamic` | int8 (per channel) | float32     | 4x smaller, no calibration           |
| `float16` | float16            | float32     | 2x smaller, GPU delegates            |
| `int8`    | int8               | int8        | full integer: NPUs, DSPs, micro      |

Two routes, the same `serve` computation:
- non-recurrent models: the inference function traced once, its variables frozen into
  constants, then `from_concrete_functions` (measured on the digits CNN: 0.18 s for int8,
  against 0.9 s through a SavedModel on disk; a federation converts every round). A concrete
  function with live variables converts but fails at run time (READ_VARIABLE): freezing is
  what makes it work.
- recurrent models (and any model the frozen route fails on): Keras → SavedModel
  (`model.export`, one `serve` signature) → `from_saved_model`. `from_keras_model` fails on
  Keras 3 LSTM/GRU (`TensorListReserve`), and frozen TensorList loops do too.
The batch axis stays dynamic except for recurrent models, whose TensorList ops need a fixed
batch of 1. `int8` is calibrated on a representative sample
of the training data in the input's own dtype (token ids stay integers); its input/output stay
float32 unless `int8_io` is asked for, in which case the client quantizes with the scale and
zero point stored in the file (an integer-id input is never quantized: ids stay ids).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.errors import InvalidInput
from core.tensorflow import import_tensorflow, quiet_stderr

VARIANTS = ("float32", "dynamic", "float16", "int8")
CALIBRATION_SAMPLES = 200


class ConversionFailed(InvalidInput):
    """The TFLite converter refused the model: the message names the op or layer."""


def has_recurrent_layers(model) -> bool:
    """Whether any layer, however deep (a Bidirectional's forward and backward RNNs, a nested
    model's layers), is a `keras.layers.RNN`: its loop needs the fixed-batch SavedModel route."""
    import keras

    def walk(layer):
        flatten = getattr(layer, "_flatten_layers", None)
        if flatten is not None:  # every tracked sub-layer, Bidirectional's inner RNNs included
            yield from flatten(include_self=True)
            return
        yield layer
        for child in getattr(layer, "layers", []) or []:
            yield from walk(child)

    return any(isinstance(layer, keras.layers.RNN) for layer in walk(model))


def saved_model(model, folder: Path) -> Path:
    """Export the inference graph once; every variant converts from it."""
    tf = import_tensorflow()
    batch = 1 if has_recurrent_layers(model) else None
    specs = [tf.TensorSpec([batch, *tensor.shape[1:]], tensor.dtype) for tensor in model.inputs]
    path = folder / "saved_model"
    with quiet_stderr():
        model.export(str(path), format="tf_saved_model", input_signature=specs, verbose=False)
    return path


def frozen_function(model):
    """The model's inference function with its variables folded into constants (non-recurrent
    models): converts without a SavedModel on disk."""
    tf = import_tensorflow()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    specs = [tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype) for tensor in model.inputs]
    serve = tf.function(lambda *inputs: model(list(inputs) if len(inputs) > 1 else inputs[0], training=False),
                        input_signature=specs)
    with quiet_stderr():
        return convert_variables_to_constants_v2(serve.get_concrete_function())


def input_dtype(model) -> np.dtype:
    """The dtype the model's (first) input takes: float32 for most, int32/int64 for token ids."""
    dtype = np.dtype(str(getattr(model.inputs[0], "dtype", "float32")))
    return np.dtype(np.float32) if dtype == np.float64 else dtype


def as_input(x, dtype) -> np.ndarray:
    """Cast samples to the model's input dtype; integer ids are rounded, never truncated."""
    x = np.asarray(x)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(x.dtype, np.integer):
        x = np.round(x)
    return x.astype(dtype, copy=False)


def convert(source, variant: str, *, calibration: np.ndarray | None = None, int8_io: bool = False,
            dtype=np.float32) -> bytes:
    """One variant's .tflite bytes, from a SavedModel folder or a frozen concrete function.

    `calibration` feeds int8's representative dataset in the input's real `dtype` (token ids
    stay integers: a float32 sample into an int32 input is refused by the calibrator)."""
    tf = import_tensorflow()
    if variant not in VARIANTS:
        raise InvalidInput(f"unknown TFLite variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if isinstance(source, (str, Path)):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(source))
    else:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([source])
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant == "int8":
        if calibration is None or len(calibration) == 0:
            raise InvalidInput("int8 needs a representative sample of inputs to calibrate on")
        sample = as_input(calibration[:CALIBRATION_SAMPLES], dtype)

        def representative():
            for row in sample:
                yield [row[np.newaxis]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            if np.issubdtype(np.dtype(dtype), np.floating):  # integer ids stay integer ids
                converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        with quiet_stderr():
            return converter.convert()
    except Exception as exc:  # the converter raises several unrelated types
        raise ConversionFailed(f"TFLite {variant} conversion failed: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    """The line of an exception worth showing a user (converters put the op name there)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    missing = sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text)))
    if missing:  # the converter's MLIR dump, condensed to the ops it could not place
        return f"ops TFLite cannot run: {', '.join(missing)}"
    for line in lines:  # MLIR errors: the line naming the op beats the generic header
        if "error:" in line and ("op" in line or "'tf." in line):
            return line[:400]
    return lines[0][:400]


def write_tflite(model, out_dir: Path, variants=VARIANTS, *, calibration=None, int8_io=False) -> dict[str, Path]:
    """Write `<variant>.tflite` files into out_dir; returns {variant: path}. Raises on the
    first variant that cannot be made (see `write_tflite_each` for per-variant outcomes)."""
    written, refused = write_tflite_each(model, out_dir, variants, calibration=calibration, int8_io=int8_io)
    if refused:
        raise next(iter(refused.values()))
    return written


def write_tflite_each(model, out_dir: Path, variants=VARIANTS, *, calibration=None, int8_io=False,
                      seconds: dict | None = None) -> tuple[dict[str, Path], dict[str, ConversionFailed]]:
    """Write every variant it can; returns ({variant: path}, {variant: the error}).

    One variant failing (int8 on an op without an integer kernel, say) leaves the others.
    `seconds`, when given, receives each variant's conversion time (the shared trace or
    SavedModel export is counted in the first variant's)."""
    seconds = {} if seconds is None else seconds
    clock = [time.perf_counter()]

    def lap(variant: str) -> None:
        now = time.perf_counter()
        seconds[variant] = seconds.get(variant, 0.0) + now - clock[0]
        clock[0] = now

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = input_dtype(model)
    written: dict[str, Path] = {}
    refused: dict[str, ConversionFailed] = {}
    pending = list(variants)
    if not has_recurrent_layers(model):
        try:
            source = frozen_function(model)
        except Exception:  # some graphs only convert from a SavedModel: take the long way below
            source = None
        if source is not None:
            for variant in list(pending):
                try:
                    written[variant] = _write(out_dir / f"{variant}.tflite", convert(
                        source, variant, calibration=calibration, int8_io=int8_io, dtype=dtype))
                    pending.remove(variant)
                except ConversionFailed:
                    pass  # retried from a SavedModel below
                lap(variant)
    if pending:
        with tempfile.TemporaryDirectory(prefix="pollinate-savedmodel-") as scratch:
            try:
                source = saved_model(model, Path(scratch))
            except Exception as exc:
                error = ConversionFailed(f"TFLite conversion failed: cannot export a SavedModel: {first_line(exc)}")
                return written, dict.fromkeys(pending, error)
            recurrent = has_recurrent_layers(model)
            for variant in pending:
                try:
                    if recurrent and variant == "int8":
                        content = convert_isolated(source, variant, calibration=calibration, int8_io=int8_io, dtype=dtype)
                    else:
                        content = convert(source, variant, calibration=calibration, int8_io=int8_io, dtype=dtype)
                    written[variant] = _write(out_dir / f"{variant}.tflite", content)
                except ConversionFailed as exc:
                    refused[variant] = exc
                lap(variant)
    half = half_precision_layer(model)
    if half is not None:  # the converter's MLIR error names a MatMul, not the cause
        refused = {v: ConversionFailed(f"TFLite {v} conversion failed: {half}") for v in refused}
    return {v: written[v] for v in variants if v in written}, refused


def half_precision_layer(model) -> str | None:
    """A sentence naming the first layer that computes in float16/bfloat16 (a mixed precision
    policy), or None: TFLite's builtin float kernels (FULLY_CONNECTED, CONV_2D) take float32,
    so the converter fails on such a layer's half-precision MatMul/Conv."""
    flatten = getattr(model, "_flatten_layers", None)
    for layer in flatten(include_self=False) if flatten else []:
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and getattr(policy, "compute_dtype", "float32") in ("float16", "bfloat16"):
            return (f"layer {layer.name!r} ({type(layer).__name__}) computes in {policy.compute_dtype} "
                    f"(dtype policy {policy.name!r}); TFLite's float kernels take float32: re-save the model under "
                    "the float32 policy (its weights are float32 already)")
    return None


def convert_isolated(saved_model_dir: Path, variant: str, *, calibration, int8_io: bool, dtype) -> bytes:
    """`convert` in a child process. Calibrating Keras 3 GRU/LSTM SavedModels kills the TF 2.19
    converter with a segfault (measured): in a child, that refuses one variant instead of
    ending the export (and a federation's process) with it."""
    if calibration is None or len(calibration) == 0:
        raise InvalidInput(f"{variant} needs a representative sample of inputs to calibrate on")
    with tempfile.TemporaryDirectory(prefix="pollinate-convert-") as scratch:
        sample, out = Path(scratch) / "calibration.npy", Path(scratch) / "model.tflite"
        np.save(sample, as_input(np.asarray(calibration)[:CALIBRATION_SAMPLES], dtype))
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
               "TF_CPP_MIN_LOG_LEVEL": "3"}
        try:
            child = subprocess.run([sys.executable, "-m", "export.tflite", str(saved_model_dir), variant, str(sample),
                                    str(out), "1" if int8_io else "0"], capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            raise ConversionFailed(f"TFLite {variant} conversion did not finish in 900 s") from None
        if child.returncode < 0:
            raise ConversionFailed(f"TFLite {variant}: the converter crashed (signal {-child.returncode}) "
                                   "while calibrating; TensorFlow 2.19 cannot quantize these recurrent layers to int8")
        if child.returncode != 0 or not out.is_file():
            lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
            raise ConversionFailed(lines[-1] if lines else f"TFLite {variant} conversion failed (exit {child.returncode})")
        return out.read_bytes()


def _child_main(argv: list[str]) -> int:
    """`python -m export.tflite SAVED_MODEL VARIANT CALIBRATION.npy OUT.tflite INT8_IO`."""
    saved, variant, sample, out, int8_io = argv
    calibration = np.load(sample)
    try:
        content = convert(saved, variant, calibration=calibration, int8_io=int8_io == "1", dtype=calibration.dtype)
    except ConversionFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    Path(out).write_bytes(content)
    return 0


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


class LiteRTRunner:
    """Runs a .tflite file with LiteRT, quantizing int8 inputs/outputs when the file asks for it."""

    def __init__(self, model: bytes | Path, *, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        content = Path(model).read_bytes() if isinstance(model, (str, Path)) else model
        with quiet_stderr():
            self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.fixed_batch = int(self.input["shape_signature"][0]) == 1
        self._batch = None

    def _prepare(self, batch: int) -> None:
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self.input["index"], [batch, *self.input["shape"][1:]])
            with quiet_stderr():  # LiteRT announces its XNNPACK delegate on stderr
                self.interpreter.allocate_tensors()
            self._batch = batch

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        scale, zero = self.input["quantization"]
        if dtype == np.float32 or not scale:  # float input, or integer ids (no quantization)
            return as_input(x, dtype)
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        scale, zero = self.output["quantization"]
        if self.output["dtype"] == np.float32 or not scale:
            return y
        return (y.astype(np.float32) - zero) * scale

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """One sample (with its batch axis of 1): what a phone does per request."""
        self._prepare(1)
        self.interpreter.set_tensor(self.input["index"], self._quantize(x))
        self.interpreter.invoke()
        return self._dequantize(self.interpreter.get_tensor(self.output["index"]))

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        x = np.asarray(x)
        if self.fixed_batch:
            return np.concatenate([self.predict_one(x[i : i + 1]) for i in range(len(x))])
        outputs = []
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            self._prepare(len(chunk))
            self.interpreter.set_tensor(self.input["index"], self._quantize(chunk))
            self.interpreter.invoke()
            outputs.append(self._dequantize(self.interpreter.get_tensor(self.output["index"])).copy())
        return np.concatenate(outputs)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
