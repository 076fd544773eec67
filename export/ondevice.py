"""On-device training TFLite (`tflite-train`): a phone fine-tunes locally and hands its
weights back to the federation.

Signatures (all tensors float32 unless said; `x` has the model's input dtype, int32 for token ids):

| signature     | inputs                          | outputs                  |
|---------------|---------------------------------|--------------------------|
| `infer`       | `x` [batch, *input]             | `output` (probabilities or values) |
| `train`       | `x` [batch, *input], `y` [batch] (int32 class ids or float32 targets) | `loss` [] |
| `get_weights` | —                               | `weights` [n]: every Keras weight, flattened and concatenated in `model.weights` order |
| `set_weights` | `weights` [n]                   | `count` [] (= n)          |
| `save`        | `checkpoint_path` (string)      | `checkpoint_path`        |
| `restore`     | `checkpoint_path` (string)      | `checkpoint_path`        |

`weights` uses the same order and shapes as `keras.Model.get_weights()`, so a federated
client can send `get_weights()` as a Flower update unchanged. The optimizer's state is part
of the checkpoint (so a restored phone continues where it stopped) but not of `weights`.

Saving to a file needs TensorFlow ops that TFLite's builtins lack (Flex / SELECT_TF_OPS),
so this variant runs with TensorFlow's interpreter (or LiteRT with the Flex delegate on a
phone), not with the plain ai-edge-litert wheel. Keras 3 keeps its variables behind
wrappers: the module must track `v.value` of every model and optimizer variable, or every
signature fails with `READ_VARIABLE variable != nullptr`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from core.errors import InvalidInput
from core.tensorflow import import_tensorflow, quiet_stderr

from .tflite import ConversionFailed, as_input, first_line, input_dtype

SIGNATURES = ("infer", "train", "get_weights", "set_weights", "save", "restore")


def build_training_module(model, *, task: str, learning_rate: float = 1e-3):
    """A tf.Module whose tf.functions are the on-device signatures."""
    tf = import_tensorflow()
    import keras

    if len(model.inputs) != 1:
        raise InvalidInput("on-device training export supports single-input models")
    input_shape = [None, *model.inputs[0].shape[1:]]
    x_dtype = tf.as_dtype(str(input_dtype(model)))  # token ids stay integers
    classification = task == "classification"
    loss_fn = keras.losses.SparseCategoricalCrossentropy() if classification else keras.losses.MeanSquaredError()
    y_spec = tf.TensorSpec([None], tf.int32 if classification else tf.float32, name="y")
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(model.trainable_variables)
    weights = list(model.weights)
    shapes = [tuple(int(d) for d in w.shape) for w in weights]
    sizes = [int(np.prod(s)) if s else 1 for s in shapes]
    total = int(sum(sizes))
    checkpoint_vars = weights + list(optimizer.variables)
    checkpoint_names = [f"{i}:{v.path}" for i, v in enumerate(checkpoint_vars)]

    class OnDevice(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            # Keras 3 wraps tf.Variables; track the real ones so the converter keeps them
            # (model.variables also holds Dropout's seed-generator state, which train uses).
            self.tracked = [v.value for v in list(model.variables) + list(optimizer.variables)]

        @tf.function(input_signature=[tf.TensorSpec(input_shape, x_dtype, name="x")])
        def infer(self, x):
            return {"output": self.model(x, training=False)}

        @tf.function(input_signature=[tf.TensorSpec(input_shape, x_dtype, name="x"), y_spec])
        def train(self, x, y):
            with tf.GradientTape() as tape:
                prediction = self.model(x, training=True)
                loss = loss_fn(y, prediction)
            gradients = tape.gradient(loss, self.model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
            return {"loss": loss}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {"weights": tf.concat([tf.cast(tf.reshape(w.value, [-1]), tf.float32) for w in weights], axis=0)}

        @tf.function(input_signature=[tf.TensorSpec([total], tf.float32, name="weights")])
        def set_weights(self, flat):
            parts = tf.split(flat, sizes)
            for w, part, shape in zip(weights, parts, shapes):
                w.assign(tf.reshape(tf.cast(part, w.dtype), shape))
            return {"count": tf.constant(total, tf.int32)}

        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="checkpoint_path")])
        def save(self, checkpoint_path):
            tf.raw_ops.Save(filename=checkpoint_path, tensor_names=checkpoint_names,
                            data=[v.value for v in checkpoint_vars])
            return {"checkpoint_path": checkpoint_path}

        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="checkpoint_path")])
        def restore(self, checkpoint_path):
            for name, v in zip(checkpoint_names, checkpoint_vars):
                restored = tf.raw_ops.Restore(file_pattern=checkpoint_path, tensor_name=name, dt=v.dtype)
                v.assign(tf.ensure_shape(restored, v.shape))
            return {"checkpoint_path": checkpoint_path}

    return OnDevice(), total


def write_training_tflite(model, path: Path, *, task: str, learning_rate: float = 1e-3) -> Path:
    """Convert the training module to `path` (builtins + Flex ops, resource variables on)."""
    tf = import_tensorflow()

    # tracing only records the graph: the Keras model's own weights are not changed
    module, _ = build_training_module(model, task=task, learning_rate=learning_rate)
    with tempfile.TemporaryDirectory(prefix="pollinate-train-sm-") as scratch:
        signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
        with quiet_stderr():
            tf.saved_model.save(module, scratch, signatures=signatures)
        _batch_matmuls_for_activations(Path(scratch) / "saved_model.pb")
        converter = tf.lite.TFLiteConverter.from_saved_model(scratch, signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        converter.experimental_enable_resource_variables = True
        try:
            with quiet_stderr():
                content = converter.convert()
        except Exception as exc:
            raise ConversionFailed(f"on-device training conversion failed: {first_line(exc)}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# Ops the converter folds into a FULLY_CONNECTED as its fused activation.
_FUSED_ACTIVATIONS = frozenset({"Relu", "Relu6", "Maximum", "Minimum", "ClipByValue", "Tanh"})


def _batch_matmuls_for_activations(saved_model_pb: Path) -> int:
    """Rewrite each MatMul that feeds an activation as ExpandDims → BatchMatMulV2 → Squeeze.

    With resource variables the converter turns `MatMul(x, W)` into FULLY_CONNECTED(x,
    TRANSPOSE(W)) with no bias, fuses a following Relu/Relu6/clip into it, and then its
    batch-matmul pass folds the transpose into BATCH_MATMUL *dropping the fused activation*
    (TF 2.19; `relu(x @ W)`, e.g. a custom layer's or a bias-free Dense's, ran as `x @ W`).
    A rank-3 BatchMatMulV2 is not made a FULLY_CONNECTED, so the activation stays its own op.
    Returns how many MatMuls were rewritten."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(saved_model_pb.read_bytes())
    rewritten = 0
    for meta in saved.meta_graphs:
        for function in meta.graph_def.library.function:
            rewritten += _rewrite_function(function)
    if rewritten:
        saved_model_pb.write_bytes(saved.SerializeToString())
    return rewritten


def _rewrite_function(function) -> int:
    from tensorflow.core.framework import node_def_pb2

    consumers: dict[str, set[str]] = {}
    for node in function.node_def:
        for ref in node.input:
            consumers.setdefault(ref.lstrip("^").split(":")[0], set()).add(node.op)
    targets = {node.name for node in function.node_def
               if node.op == "MatMul" and consumers.get(node.name, set()) & _FUSED_ACTIVATIONS}
    if not targets:
        return 0
    nodes = []
    for node in function.node_def:
        for i, ref in enumerate(node.input):
            name, _, rest = ref.partition(":")
            if name in targets and rest.startswith("product:"):
                node.input[i] = f"{name}:output:{rest.split(':', 1)[1]}"
        if node.name not in targets:
            nodes.append(node)
            continue
        a, b, *control = node.input
        dtype = node.attr["T"]
        axis = node_def_pb2.NodeDef(name=f"{node.name}/pollinate_axis", op="Const")
        axis.attr["dtype"].type = 3  # int32
        axis.attr["value"].tensor.dtype = 3
        axis.attr["value"].tensor.tensor_shape.SetInParent()
        axis.attr["value"].tensor.int_val.append(0)
        expand = node_def_pb2.NodeDef(name=f"{node.name}/pollinate_expand", op="ExpandDims",
                                      input=[a, f"{axis.name}:output:0"])
        expand.attr["T"].CopyFrom(dtype)
        expand.attr["Tdim"].type = 3
        bmm = node_def_pb2.NodeDef(name=f"{node.name}/pollinate_bmm", op="BatchMatMulV2",
                                   input=[f"{expand.name}:output:0", b, *control])
        bmm.attr["T"].CopyFrom(dtype)
        bmm.attr["adj_x"].b = node.attr["transpose_a"].b
        bmm.attr["adj_y"].b = node.attr["transpose_b"].b
        squeeze = node_def_pb2.NodeDef(name=node.name, op="Squeeze", input=[f"{bmm.name}:output:0"])
        squeeze.attr["T"].CopyFrom(dtype)
        squeeze.attr["squeeze_dims"].list.i.append(0)
        nodes += [axis, expand, bmm, squeeze]
    del function.node_def[:]
    function.node_def.extend(nodes)
    return len(targets)


class OnDeviceTrainer:
    """Drives a `tflite-train` file with TensorFlow's interpreter (Flex ops included):
    what a phone does, on this machine."""

    def __init__(self, path: Path):
        tf = import_tensorflow()
        with quiet_stderr():
            self.interpreter = tf.lite.Interpreter(model_path=str(path))
            self.interpreter.allocate_tensors()
        self.runners = {name: self.interpreter.get_signature_runner(name) for name in SIGNATURES}
        self.x_dtype = self.runners["infer"].get_input_details()["x"]["dtype"]

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.runners["infer"](x=as_input(x, self.x_dtype))["output"]

    def train(self, x: np.ndarray, y: np.ndarray) -> float:
        y = np.asarray(y)
        y = y.astype(np.int32) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
        return float(self.runners["train"](x=as_input(x, self.x_dtype), y=y)["loss"])

    def get_weights(self) -> np.ndarray:
        return self.runners["get_weights"]()["weights"]

    def set_weights(self, flat: np.ndarray) -> int:
        return int(self.runners["set_weights"](weights=np.asarray(flat, np.float32))["count"])

    def save(self, path: Path) -> None:
        self.runners["save"](checkpoint_path=np.array(str(path).encode()))

    def restore(self, path: Path) -> None:
        self.runners["restore"](checkpoint_path=np.array(str(path).encode()))


def flatten_weights(weights: list[np.ndarray]) -> np.ndarray:
    """Keras `get_weights()` → the flat vector the `tflite-train` signatures use."""
    return np.concatenate([np.asarray(w, np.float32).reshape(-1) for w in weights])


def unflatten_weights(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """The flat vector → arrays shaped like `like` (a Keras `get_weights()` list)."""
    out, offset = [], 0
    for w in like:
        size = int(np.prod(w.shape)) if w.shape else 1
        out.append(np.asarray(flat[offset : offset + size], dtype=w.dtype).reshape(w.shape))
        offset += size
    if offset != len(flat):
        raise InvalidInput(f"weight vector has {len(flat)} values, the model needs {offset}")
    return out
