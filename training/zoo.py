"""The model zoo: Keras 3 models that every export format supports (TF.js, TFLite, on-device).

Only layers that TensorFlow.js and TFLite both run are used. Tabular models normalise their
inputs inside the model (a `Normalization` layer adapted on the training split) and scale
regression outputs back to the target's units, so a client only builds the raw feature vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.errors import InvalidInput

from .datasets import CLASSIFICATION, Dataset


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    builders: dict[str, Callable[..., object]]  # dataset kind ("image", "tabular") -> builder
    learning_rate: float = 1e-3  # Adam's default step; measured per model on digits / delivery-eta


def _head(keras, x, dataset: Dataset):
    """Softmax over the classes, or one linear output rescaled to the target's mean and spread."""
    if dataset.task == CLASSIFICATION:
        return keras.layers.Dense(dataset.num_classes, activation="softmax", name="probabilities")(x)
    mean = float(dataset.y_train.mean())
    std = float(dataset.y_train.std()) or 1.0
    x = keras.layers.Dense(1, name="standardised_output")(x)
    return keras.layers.Rescaling(scale=std, offset=mean, name="output")(x)


def build_cnn(dataset: Dataset, *, width: int = 32):
    import keras

    inputs = keras.Input(shape=dataset.input_shape, name="image")
    x = keras.layers.Conv2D(width // 2, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.25, name="dropout")(x)
    x = keras.layers.Dense(2 * width, activation="relu", name="dense")(x)
    outputs = _head(keras, x, dataset)
    return keras.Model(inputs, outputs, name="cnn")


def build_image_mlp(dataset: Dataset, *, width: int = 128):
    import keras

    inputs = keras.Input(shape=dataset.input_shape, name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(width, activation="relu", name="dense1")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    x = keras.layers.Dense(width // 2, activation="relu", name="dense2")(x)
    outputs = _head(keras, x, dataset)
    return keras.Model(inputs, outputs, name="mlp")


def build_tabular_mlp(dataset: Dataset, *, width: int = 64):
    import keras

    normalise = keras.layers.Normalization(axis=-1, name="normalise")
    normalise.adapt(dataset.x_train)
    inputs = keras.Input(shape=dataset.input_shape, name="features")
    x = normalise(inputs)
    x = keras.layers.Dense(width, activation="relu", name="dense1")(x)
    x = keras.layers.Dense(width, activation="relu", name="dense2")(x)
    x = keras.layers.Dense(width // 2, activation="relu", name="dense3")(x)
    outputs = _head(keras, x, dataset)
    return keras.Model(inputs, outputs, name="tabular_mlp")


ZOO = {
    "cnn": ZooEntry("cnn", "small CNN: two 3x3 convolutions, max-pool, dense", {"image": build_cnn}, learning_rate=3e-3),
    "mlp": ZooEntry(
        "mlp",
        "multi-layer perceptron (tables: normalisation baked in)",
        {"image": build_image_mlp, "tabular": build_tabular_mlp},
    ),
}


def zoo_entry(name: str) -> ZooEntry:
    entry = ZOO.get(name)
    if entry is None:
        raise InvalidInput(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}")
    return entry


def build_model(name: str, dataset: Dataset, *, width: int | None = None):
    """Build zoo model `name` for `dataset`; refuse a pairing that does not make sense."""
    entry = zoo_entry(name)
    builder = entry.builders.get(dataset.kind)
    if builder is None:
        fits = [n for n, e in ZOO.items() if dataset.kind in e.builders]
        raise InvalidInput(f"model {name!r} does not apply to {dataset.kind} data; use: {', '.join(fits)}")
    if width is not None and width < 2:
        raise InvalidInput("--width must be at least 2")
    return builder(dataset) if width is None else builder(dataset, width=width)
