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
of the training data; its input/output stay float32 unless `int8_io` is asked for, in which
case the client quantizes with the scale and zero point stored in the file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from core.errors import InvalidInput
from core.tensorflow import import_tensorflow, quiet_stderr

VARIANTS = ("float32", "dynamic", "float16", "int8")
CALIBRATION_SAMPLES = 200


class ConversionFailed(InvalidInput):
    """The TFLite converter refused the model: the message names the op or layer."""


def has_recurrent_layers(model) -> bool:
    import keras

    def walk(layer):
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


def convert(source, variant: str, *, calibration: np.ndarray | None = None, int8_io: bool = False) -> bytes:
    """One variant's .tflite bytes, from a SavedModel folder or a frozen concrete function."""
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
        sample = np.asarray(calibration, dtype=np.float32)[:CALIBRATION_SAMPLES]

        def representative():
            for row in sample:
                yield [row[np.newaxis]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        with quiet_stderr():
            return converter.convert()
    except Exception as exc:  # the converter raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionFailed(f"TFLite {variant} conversion failed: {first}") from exc


def write_tflite(model, out_dir: Path, variants=VARIANTS, *, calibration=None, int8_io=False) -> dict[str, Path]:
    """Write `<variant>.tflite` files into out_dir; returns {variant: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not has_recurrent_layers(model):
        try:
            source = frozen_function(model)
            return {variant: _write(out_dir / f"{variant}.tflite",
                                    convert(source, variant, calibration=calibration, int8_io=int8_io))
                    for variant in variants}
        except (ConversionFailed, ValueError, TypeError):
            pass  # some graphs only convert from a SavedModel: take the long way below
    with tempfile.TemporaryDirectory(prefix="pollinate-savedmodel-") as scratch:
        source = saved_model(model, Path(scratch))
        return {variant: _write(out_dir / f"{variant}.tflite",
                                convert(source, variant, calibration=calibration, int8_io=int8_io))
                for variant in variants}


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
        if dtype == np.float32:
            return x.astype(np.float32)
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if self.output["dtype"] == np.float32:
            return y
        scale, zero = self.output["quantization"]
        return (y.astype(np.float32) - zero) * scale

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        """One sample (with its batch axis of 1): what a phone does per request."""
        self._prepare(1)
        self.interpreter.set_tensor(self.input["index"], self._quantize(x))
        self.interpreter.invoke()
        return self._dequantize(self.interpreter.get_tensor(self.output["index"]))

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
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
