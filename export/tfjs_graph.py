"""Keras 3 → TensorFlow.js *graph model* (`model.json` with a TF GraphDef + weight shards).

For the models a tfjs-layers LayersModel cannot express (GRU with `reset_after=True`,
`MultiHeadAttention`, causal `Conv1D`, `hard_silu`, any layer `export.tfjs_layers` does not
know): the Keras model is exported as a SavedModel with a batch-free input signature
(`model.export(..., format="tf_saved_model")`), and the stock `tensorflowjs` converter turns
that into a graph model that `tf.loadGraphModel` runs (inference only: a graph model does not
train in TF.js). `control_flow_v2=True` keeps recurrent layers' `While` loops as they are
(TensorList ops TF.js implements), which is what makes GRU/LSTM convert.

    write_tfjs_graph(model, out_dir, quantize=None)   # -> [out_dir/model.json, shards...]
    graph_ops(out_dir / "model.json")                 # the TF ops the graph runs

An op TF.js has no kernel for (exact GELU's `Erfc`, ...) makes the converter refuse the model;
that becomes `TfjsUnsupported` naming the op(s). Nothing is left in `out_dir` then.

The converter is imported lazily and in-process: `import tensorflowjs` costs about 0.4 s once
TensorFlow is loaded (it pulls in TF Decision Forests, JAX and Flax, whose banner goes to
stdout unless told not to: it is, and the import and the conversion run with stdout captured: `--json` output stays clean).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from core.errors import InvalidInput, PollinateError

MODEL_JSON = "model.json"
QUANTIZE_CHOICES = (None, "float16", "uint8")
_SHARD_NAME = re.compile(r"^group\d+-shard\d+of\d+\.bin$")
_UNSUPPORTED = re.compile(r"Unsupported Ops in the model(?: before| after)? optimization\s*(.*)", re.S)
_convert_lock = threading.Lock()  # the converter builds TF1-style graphs: one conversion at a time


class TfjsUnsupported(InvalidInput):
    """Neither TF.js path can run the model: `ops` are the TF ops TensorFlow.js has no kernel for;
    `layer_reason` (when the LayersModel path was tried first) why no LayersModel either."""

    def __init__(self, ops: list[str], layer_reason: str | None = None):
        self.ops = list(ops)
        self.layer_reason = layer_reason
        names = ", ".join(self.ops) or "?"
        message = f"TensorFlow.js has no op {names} (used by this model): TF.js export refused"
        if layer_reason:
            message += f"; no LayersModel either: {layer_reason}"
        super().__init__(message)


def _converter():
    """`tensorflowjs`' SavedModel converter, imported once, quietly."""
    from core.tensorflow import import_tensorflow

    import_tensorflow()
    # TF Decision Forests prints a banner on import (and, with stdout redirected, would think it
    # runs in a notebook and import IPython): its own switch turns it off.
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        from tensorflowjs.converters import tf_saved_model_conversion_v2
    return tf_saved_model_conversion_v2


def _signature(model):
    import tensorflow as tf

    specs = []
    for i, tensor in enumerate(model.inputs):
        dtype = tensor.dtype if isinstance(tensor.dtype, str) else getattr(tensor.dtype, "name", "float32")
        specs.append(tf.TensorSpec([None, *tensor.shape[1:]], dtype or "float32", name=f"input_{i}"))
    return [specs[0]] if len(specs) == 1 else [specs]


def save_model(model, saved_model_dir) -> Path:
    """`model` as a SavedModel with a `serving_default` signature over batch-free inputs."""
    from .tfjs import _model_inputs  # the same "is this a model with inputs" checks as the LayersModel path

    _model_inputs(model)
    saved_model_dir = Path(saved_model_dir)
    model.export(str(saved_model_dir), format="tf_saved_model", input_signature=_signature(model), verbose=False)
    return saved_model_dir


def _quantization_map(quantize: str | None) -> dict | None:
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidInput(f"quantize must be one of None, 'float16', 'uint8'; got {quantize!r}")
    return None if quantize is None else {quantize: True}


def _unsupported_ops(message: str) -> list[str] | None:
    match = _UNSUPPORTED.search(message)
    if not match:
        return None
    return sorted({op for op in re.split(r"[\s,]+", match.group(1).strip()) if re.fullmatch(r"[A-Za-z_][\w>]*", op)})


def convert_saved_model(saved_model_dir, out_dir, *, quantize: str | None = None) -> list[Path]:
    """SavedModel → graph model in `out_dir` (replacing shards left by an earlier export).

    Converts into a temporary folder first, so a refused model leaves `out_dir` as it was."""
    qmap = _quantization_map(quantize)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"{out_dir} exists and is not a directory")
    converter = _converter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tfjs-graph-", dir=out_dir) as tmp, _convert_lock:
        staging = Path(tmp) / "model"
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                converter.convert_tf_saved_model(
                    str(saved_model_dir), str(staging), quantization_dtype_map=qmap, control_flow_v2=True,
                    strip_debug_ops=True, weight_shard_size_bytes=4 * 1024 * 1024,
                )
        except ValueError as err:
            ops = _unsupported_ops(str(err))
            if ops is not None:
                raise TfjsUnsupported(ops) from None
            raise PollinateError(f"the TF.js graph converter failed: {str(err).strip().splitlines()[0]}") from None
        except Exception as err:  # the converter's own failures (grappler, unknown signatures, ...)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PollinateError(f"the TF.js graph converter failed: {type(err).__name__}: {first[:300]}") from None
        document = json.loads((staging / MODEL_JSON).read_text())
        _expand_scalar_biases(document, staging)
        document["convertedBy"] = f"{document.get('convertedBy') or 'TensorFlow.js Converter'} via Pollinate (export.tfjs_graph)"
        (staging / MODEL_JSON).write_text(json.dumps(document))
        for stale in out_dir.iterdir():
            if stale.is_file() and (_SHARD_NAME.match(stale.name) or stale.name == MODEL_JSON):
                stale.unlink()
        written = []
        shards = [p for group in document.get("weightsManifest", []) for p in group["paths"]]
        for name in shards:
            shutil.move(staging / name, out_dir / name)
            written.append(out_dir / name)
        shutil.move(staging / MODEL_JSON, out_dir / MODEL_JSON)
    return [out_dir / MODEL_JSON, *written]


_FUSED = {"FusedConv2D": 3, "FusedDepthwiseConv2dNative": 3, "_FusedMatMul": 1}  # op -> filter axis giving channels
_ELEMENT_BYTES = {"float32": 4, "int32": 4, "float16": 2, "uint8": 1, "bool": 1}


def _spec_bytes(spec: dict) -> int:
    dtype = (spec.get("quantization") or {}).get("dtype") or spec["dtype"]
    count = 1
    for d in spec["shape"]:
        count *= int(d)
    return count * _ELEMENT_BYTES[dtype]


def _expand_scalar_biases(document: dict, folder: Path) -> None:
    """Give fused ops a per-channel bias where the converter folded a scalar into one.

    Grappler fuses `Conv2D + BiasAdd + Add(scalar)` (MobileNetV3's hard-sigmoid `x + 3`) into
    a FusedConv2D whose bias is a scalar constant; TF.js' cpu backend broadcasts it, but the wasm
    backend refuses ("FusedConv2D only supports rank-1 bias but got rank 0"). The scalar is
    repeated once per output channel (the same bytes, so quantized weights stay exact)."""
    topology = document.get("modelTopology") or {}
    nodes = list(topology.get("node", []))
    for function in (topology.get("library") or {}).get("function", []):
        nodes.extend(function.get("nodeDef", []))
    specs = {}
    for group_index, group in enumerate(document.get("weightsManifest", [])):
        for spec in group["weights"]:
            specs[spec["name"]] = (group_index, spec)
    expand: dict[str, int] = {}
    for node in nodes:
        axis = _FUSED.get(node.get("op"))
        inputs = [i.split(":")[0].lstrip("^") for i in node.get("input", [])]
        if axis is None or len(inputs) < 3 or inputs[2] not in specs or inputs[1] not in specs:
            continue
        bias, kernel = specs[inputs[2]][1], specs[inputs[1]][1]
        if bias["shape"] == [] and len(kernel["shape"]) > axis:
            channels = int(kernel["shape"][axis])
            if node.get("op") == "FusedDepthwiseConv2dNative":
                channels *= int(kernel["shape"][2])
            expand[inputs[2]] = channels
    if not expand:
        return
    for group_index, group in enumerate(document["weightsManifest"]):
        if not any(specs.get(name, (None,))[0] == group_index for name in expand):
            continue
        data = b"".join((folder / path).read_bytes() for path in group["paths"])
        out, at = [], 0
        for spec in group["weights"]:
            size = _spec_bytes(spec)
            chunk = data[at:at + size]
            at += size
            if spec["name"] in expand:
                spec["shape"] = [expand[spec["name"]]]
                chunk = chunk * expand[spec["name"]]
            out.append(chunk)
        payload = b"".join(out)
        for path in group["paths"]:
            (folder / path).unlink()
        shard = 4 * 1024 * 1024
        count = max(1, -(-len(payload) // shard))
        prefix = group["paths"][0].split("-shard")[0] if group["paths"] else f"group{group_index + 1}"
        group["paths"] = [f"{prefix}-shard{i + 1}of{count}.bin" for i in range(count)]
        for i, path in enumerate(group["paths"]):
            (folder / path).write_bytes(payload[i * shard:(i + 1) * shard])


def write_tfjs_graph(model, out_dir, *, quantize: str | None = None) -> list[Path]:
    """Write `model` as a TF.js graph model: `out_dir/model.json` + shards; return their paths
    (model.json first). `quantize`: None (float32 weights), "float16" or "uint8" (the converter's
    weight quantization; TF.js dequantizes on load). Raises `TfjsUnsupported` naming the ops
    TF.js lacks (nothing written), `InvalidInput` for a model without defined inputs."""
    _quantization_map(quantize)
    with tempfile.TemporaryDirectory(prefix="pollinate-savedmodel-") as tmp:
        saved = save_model(model, Path(tmp) / "saved_model")
        return convert_saved_model(saved, out_dir, quantize=quantize)


def graph_ops(model_json) -> list[str]:
    """The TF ops a graph model's model.json runs (its main graph and its functions), sorted."""
    document = json.loads(Path(model_json).read_text()) if not isinstance(model_json, dict) else model_json
    topology = document.get("modelTopology") or {}
    ops = {node.get("op") for node in topology.get("node", [])}
    for function in (topology.get("library") or {}).get("function", []):
        ops.update(node.get("op") for node in function.get("nodeDef", []))
    return sorted(op for op in ops if op)
