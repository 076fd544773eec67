// Fine-tuning a TF.js LayersModel on the device's labelled examples, on a backend that can.
//
// Which backend trains: TF.js 4.22's wasm backend runs inference but has no gradient kernels
// for convolutions (Conv2DBackpropFilter and friends are "not registered for backend
// 'wasm'"), so a page that predicts on wasm trains on cpu and goes back to wasm afterwards.
// WebGL is only in use where the page found a real GPU (lib/backend.js passes over software
// WebGL), and trains there. TF.js moves a tensor's data between backends when an op on the
// other backend reads it, so the same variables serve both.
//
// The optimizer is Adam with a fresh state per call, the learning rate given: what the
// Python ClientApp does each round (federated/task.py), so a browser's update and a
// SuperNode's mean the same thing to the aggregator.

import { PollinateError } from './errors.js';

const now = () => globalThis.performance?.now() ?? Date.now();

/**
 * {name, reason}: the backend to train on when `current` runs inference. `requested` forces one.
 */
export function trainingBackendFor(current, requested = null) {
  if (requested) return { name: requested, reason: 'requested' };
  if (current === 'wasm') {
    return { name: 'cpu', reason: 'TF.js wasm has no gradient kernels for convolutions (Conv2DBackpropFilter): trains on cpu, predicts on wasm' };
  }
  if (current === 'webgl' || current === 'webgpu') return { name: current, reason: 'GPU backend: trains where it predicts' };
  return { name: current ?? 'cpu', reason: 'trains where it predicts' };
}

// The backend is global to a TF.js instance: two trainings at once (two clients in one page or
// process) would each switch it under the other, so they take turns per TF.js instance.
const turns = new WeakMap();

/** Runs `work()` with `name` as TF.js' backend, then puts the previous backend back (also on
 * failure). Calls on the same TF.js instance run one after the other. */
export function withBackend(tf, name, work) {
  const run = async () => {
    const previous = tf.getBackend();
    if (previous !== name) {
      const ok = await tf.setBackend(name);
      if (!ok) throw new PollinateError('no-backend', `the ${name} backend does not initialise here: cannot train`);
      await tf.ready();
    }
    try {
      return await work();
    } finally {
      if (previous && tf.getBackend() !== previous) {
        await tf.setBackend(previous);
        await tf.ready();
      }
    }
  };
  const result = (turns.get(tf) ?? Promise.resolve()).then(run, run);
  turns.set(tf, result.catch(() => {}));
  return result;
}

/** A cancellation error with a stable code (the signal's reason when it gave one). */
export function abortError(signal) {
  const reason = signal?.reason;
  const why = reason instanceof Error ? reason.message : reason != null ? String(reason) : 'cancelled';
  return new PollinateError('aborted', `training cancelled (${why})`, { cause: reason });
}

export function throwIfAborted(signal) {
  if (signal?.aborted) throw abortError(signal);
}

/** The number of classes of a classifier (its first output's last dimension), or a clear refusal. */
export function classCount(model) {
  if (typeof model?.fit !== 'function' || typeof model?.compile !== 'function') {
    throw new PollinateError('not-trainable', 'only a TF.js LayersModel trains; this model is a graph model (inference only): export the version with tfjs-layers');
  }
  const shape = model.outputs?.[0]?.shape ?? [];
  const classes = shape[shape.length - 1];
  if (!Number.isInteger(classes) || classes < 2) {
    throw new PollinateError('not-trainable', `training takes class labels; this model's output has shape [${shape}] (not a classifier)`);
  }
  return classes;
}

/** Checks examples against the input size and the class count; returns {xs: Float32Array, labels: Int32Array}. */
export function packExamples(examples, { size, classes }) {
  if (!Array.isArray(examples) || examples.length === 0) {
    throw new PollinateError('no-examples', 'there are no labelled examples to train on');
  }
  const xs = new Float32Array(examples.length * size);
  const labels = new Int32Array(examples.length);
  examples.forEach((example, i) => {
    const input = example?.input;
    if (!input || input.length !== size) {
      throw new PollinateError('input-shape', `example ${i} has ${input?.length ?? 0} input values; the model takes ${size}`);
    }
    for (let k = 0; k < size; k++) {
      const v = Number(input[k]);
      if (!Number.isFinite(v)) throw new PollinateError('input-nonfinite', `example ${i} holds a non-finite value at ${k}`);
      xs[i * size + k] = v;
    }
    const label = example.label;
    if (!Number.isInteger(label) || label < 0 || label >= classes) {
      throw new PollinateError('label', `example ${i}'s label must be a class index in 0..${classes - 1}, got ${JSON.stringify(label)}`);
    }
    labels[i] = label;
  });
  return { xs, labels };
}

/**
 * Fits `model` (a LayersModel on the current backend) on the examples.
 * @returns {Promise<{lossBefore: number, lossAfter: number, losses: number[], epochs: number, seconds: number}>}
 */
export async function fitOnExamples(tf, model, examples, {
  inputShape, epochs = 1, batchSize = 32, learningRate = 1e-3, signal = null, onEpoch = null,
} = {}) {
  if (!Number.isInteger(epochs) || epochs < 1) throw new PollinateError('config', `epochs must be a whole number ≥ 1, got ${epochs}`);
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new PollinateError('config', `batch_size must be a whole number ≥ 1, got ${batchSize}`);
  if (!(learningRate > 0) || !Number.isFinite(learningRate)) throw new PollinateError('config', `learning_rate must be > 0, got ${learningRate}`);
  const classes = classCount(model);
  const size = inputShape.reduce((n, d) => n * d, 1);
  const { xs, labels } = packExamples(examples, { size, classes });
  throwIfAborted(signal);
  const x = tf.tensor(xs, [examples.length, ...inputShape], 'float32');
  const y = tf.tidy(() => tf.oneHot(tf.tensor1d(labels, 'int32'), classes).toFloat());
  const optimizer = tf.train.adam(learningRate);
  const started = now();
  try {
    model.compile({ optimizer, loss: 'categoricalCrossentropy' });
    const evaluate = async () => {
      const out = model.evaluate(x, y, { batchSize });
      const loss = Array.isArray(out) ? out[0] : out;
      const value = (await loss.data())[0];
      tf.dispose(out);
      return value;
    };
    const lossBefore = await evaluate();
    const losses = [];
    await model.fit(x, y, {
      epochs, batchSize, shuffle: true, verbose: 0,
      callbacks: {
        onBatchEnd: async () => {
          if (signal?.aborted) model.stopTraining = true;
        },
        onEpochEnd: async (epoch, logs) => {
          losses.push(logs.loss);
          onEpoch?.({ epoch: epoch + 1, epochs, loss: logs.loss });
          if (signal?.aborted) model.stopTraining = true;
        },
      },
    });
    throwIfAborted(signal);
    const lossAfter = await evaluate();
    return { lossBefore, lossAfter, losses, epochs, seconds: (now() - started) / 1000 };
  } finally {
    tf.dispose([x, y]);
    optimizer.dispose();
  }
}
