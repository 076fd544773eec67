"""Model and data: what the ClientApp and the ServerApp share (Flower's `task.py`).

Clients and the server run many rounds in long-lived processes (Ray actors in simulation,
SuperNodes in deployment), so the dataset, each client's partition and the compiled model
with its traced training step are cached per process: a round only sets weights and trains.
Rebuilding the Keras model every round would re-trace its tf.function each time (~1 s).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from core.errors import InvalidInput
from core.tensorflow import import_tensorflow, quiet_keras_warnings

from .partition import partition


@lru_cache(maxsize=4)
def dataset_for(recipe_json: str):
    from training.datasets import reload_dataset

    dataset = reload_dataset(json.loads(recipe_json))
    if dataset is None:
        raise InvalidInput(f"dataset {recipe_json} is not available on this node")
    return dataset


def partition_labels(dataset) -> tuple[np.ndarray, int]:
    """What label-skewed partitions split on: the class, or for regression the target's
    decile (so `dirichlet` still gives clients different slices of the target's range)."""
    if dataset.task == "classification":
        return dataset.y_train, dataset.num_classes
    edges = np.quantile(dataset.y_train, np.linspace(0, 1, 11)[1:-1])
    return np.digitize(dataset.y_train, edges), 10


@lru_cache(maxsize=8)
def partitions_for(recipe_json: str, scheme: str, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    labels, _ = partition_labels(dataset_for(recipe_json))
    return tuple(partition(labels, num_partitions, scheme, seed=seed))


def client_data(recipe_json: str, scheme: str, num_partitions: int, partition_id: int, seed: int):
    """(x, y) of one client: its partition of the training split."""
    if not 0 <= partition_id < num_partitions:
        raise InvalidInput(f"partition id {partition_id} is outside 0..{num_partitions - 1}")
    dataset = dataset_for(recipe_json)
    indices = partitions_for(recipe_json, scheme, num_partitions, seed)[partition_id]
    return dataset.x_train[indices], dataset.y_train[indices]


def to_arrays(weights) -> list[np.ndarray]:
    """Keras weights as Flower wants them: every entry an ndarray (Keras hands back a numpy
    scalar for 0-d variables such as Normalization's sample count)."""
    return [np.asarray(w) for w in weights]


def set_model_weights(model, weights: list[np.ndarray]) -> None:
    """set_weights, then refresh layers that derive constants from their weights
    (Normalization computes mean/variance tensors from its adapt state)."""
    import keras

    model.set_weights(weights)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Normalization) and getattr(layer, "adapt_mean", None) is not None:
            layer.finalize_state()


class LocalTrainer:
    """A compiled model and its training step, reused across rounds in one process.

    The step minimises the task loss plus FedProx's proximal term (μ/2)·‖w − w_global‖²
    (μ = 0 for every other strategy), with a fresh optimizer state each round."""

    def __init__(self, architecture_json: str, task: str):
        tf = import_tensorflow()
        quiet_keras_warnings()
        import keras

        self.tf = tf
        self.model = keras.models.model_from_json(architecture_json)
        self.classification = task == "classification"
        self.loss_fn = (keras.losses.SparseCategoricalCrossentropy() if self.classification
                        else keras.losses.MeanSquaredError())
        self.optimizer = keras.optimizers.Adam(1e-3)
        self.optimizer.build(self.model.trainable_variables)
        self.anchors = [tf.Variable(v.value, trainable=False) for v in self.model.trainable_variables]
        self.mu = tf.Variable(0.0, trainable=False)

        @tf.function(reduce_retracing=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                prediction = self.model(x, training=True)
                loss = self.loss_fn(y, prediction)
                proximal = tf.add_n([tf.reduce_sum(tf.square(w.value - a))
                                     for w, a in zip(self.model.trainable_variables, self.anchors)])
                total = loss + self.mu / 2.0 * proximal
            gradients = tape.gradient(total, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
            return loss

        self._step = step

    def fit(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
            learning_rate: float, proximal_mu: float, seed: int) -> tuple[list[np.ndarray], float]:
        set_model_weights(self.model, weights)
        for anchor, variable in zip(self.anchors, self.model.trainable_variables):
            anchor.assign(variable.value)
        for variable in self.optimizer.variables:
            variable.assign(self.tf.zeros_like(variable))
        self.optimizer.learning_rate.assign(learning_rate)
        self.mu.assign(proximal_mu)
        rng = np.random.default_rng(seed)
        losses = []
        y = y.astype(np.int32) if self.classification else y.astype(np.float32)
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                losses.append(float(self._step(x[batch], y[batch])))
        return self.model.get_weights(), float(np.mean(losses)) if losses else float("nan")

    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> dict:
        set_model_weights(self.model, weights)
        prediction = np.asarray(self.model(x, training=False))
        loss = float(self.loss_fn(y, prediction))
        if self.classification:
            return {"loss": loss, "accuracy": float((prediction.argmax(axis=1) == y).mean())}
        return {"loss": loss, "mae": float(np.abs(prediction.reshape(-1) - y.reshape(-1)).mean())}


@lru_cache(maxsize=4)
def trainer_for(architecture_json: str, task: str) -> LocalTrainer:
    return LocalTrainer(architecture_json, task)
