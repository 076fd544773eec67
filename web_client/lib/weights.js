// A model's weights as the device protocol carries them: the arrays of Keras
// `model.get_weights()` of the base version, in that order, each flattened row-major and
// concatenated into one little-endian float32 (or float16) vector. A task lists the arrays
// ({name, shape, dtype}); the device sets the task's base weights, trains, and sends
// local − base in the same order.
//
// TF.js does not promise Keras' order: a LayersModel lists all trainable weights before the
// non-trainable ones (Keras lists each layer's weights together, so a BatchNormalization's
// moving statistics sit elsewhere), and it renames a variable that another model in the same
// page already uses ("conv1/kernel_1"). So every array of the task is matched to a TF.js
// variable by its Keras name (TF.js keeps it as `originalName`) and its shape, never by
// position alone; generic names (`weight_3`, what a gateway sends without names) fall back
// to position, still checked by shape.

import { PollinateError } from './errors.js';

const GENERIC_NAME = /^weight_\d+$/;
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

const product = shape => shape.reduce((n, d) => n * d, 1);
const sameShape = (a, b) => a.length === b.length && a.every((d, i) => d === b[i]);
const keyName = variable => String(variable.originalName ?? variable.name).replace(/:\d+$/, '');

/** Values in the flat vector of a task's `weights` list. */
export function flatSize(spec) {
  return spec.reduce((n, w) => n + product(w.shape), 0);
}

/** The two names denote the same Keras variable: equal, or one is the other under a prefix
 * ("cnn/conv1/kernel" vs "conv1/kernel": Keras 2 paths carry the model's name). */
function namesMatch(specName, variableName) {
  if (specName === variableName) return true;
  return specName.endsWith(`/${variableName}`) || variableName.endsWith(`/${specName}`);
}

/**
 * The TF.js variables of `model` in the order of the task's `spec` ([{name, shape, dtype}]),
 * or PollinateError('weights-mismatch') naming the first array that has no counterpart.
 */
export function weightsInSpecOrder(model, spec) {
  if (!Array.isArray(spec) || spec.length === 0) {
    throw new PollinateError('weights-mismatch', 'the task lists no weights');
  }
  const variables = model.weights;
  if (variables.length !== spec.length) {
    throw new PollinateError('weights-mismatch', `the task lists ${spec.length} weight arrays; this model has ${variables.length} (${variables.map(keyName).join(', ')})`);
  }
  const used = new Set();
  return spec.map((want, position) => {
    const shape = (want.shape ?? []).map(Number);
    if (want.dtype && want.dtype !== 'float32') {
      throw new PollinateError('weights-mismatch', `weight ${want.name} is ${want.dtype}; devices train float32 weights`);
    }
    let found;
    if (GENERIC_NAME.test(String(want.name ?? ''))) {
      found = variables[position];
    } else {
      found = variables.find(v => !used.has(v) && namesMatch(String(want.name), keyName(v)));
      if (!found) {
        throw new PollinateError('weights-mismatch', `the task's weight ${position} (${want.name}, shape [${shape}]) is not a weight of this model (${variables.map(keyName).join(', ')})`);
      }
    }
    if (!sameShape(found.shape, shape)) {
      throw new PollinateError('weights-mismatch', `the task's weight ${position} (${want.name}) has shape [${shape}]; the model's ${keyName(found)} has [${found.shape}]`);
    }
    used.add(found);
    return found;
  });
}

/** The variables' values concatenated into one Float32Array (spec order). */
export function readFlat(variables) {
  const out = new Float32Array(variables.reduce((n, v) => n + product(v.shape), 0));
  let offset = 0;
  for (const v of variables) {
    const values = v.read().dataSync();
    out.set(values, offset);
    offset += values.length;
  }
  return out;
}

/** Writes `flat` (spec order) into the variables. */
export function writeFlat(tf, variables, flat) {
  const total = variables.reduce((n, v) => n + product(v.shape), 0);
  if (flat.length !== total) {
    throw new PollinateError('weights-mismatch', `got ${flat.length} values for weights that hold ${total}`);
  }
  let offset = 0;
  for (const v of variables) {
    const size = product(v.shape);
    const value = tf.tensor(flat.subarray(offset, offset + size), v.shape, 'float32');
    v.write(value);
    value.dispose();
    offset += size;
  }
}

/** local − base, element by element; refuses vectors of different lengths or non-finite results. */
export function weightDelta(local, base) {
  if (local.length !== base.length) {
    throw new PollinateError('weights-mismatch', `local weights hold ${local.length} values, the base ${base.length}`);
  }
  const out = new Float32Array(local.length);
  for (let i = 0; i < local.length; i++) {
    const d = local[i] - base[i];
    if (!Number.isFinite(d)) throw new PollinateError('non-finite', `the update is not finite at value ${i}: training diverged`);
    out[i] = d;
  }
  return out;
}

/** Euclidean norm (accumulated in float64, as the server computes it). */
export function l2Norm(values) {
  let sum = 0;
  for (let i = 0; i < values.length; i++) sum += values[i] * values[i];
  return Math.sqrt(sum);
}

/** The bytes of `values` as little-endian float32, whatever this machine's byte order. */
export function float32LE(values) {
  const array = values instanceof Float32Array ? values : Float32Array.from(values);
  if (LITTLE_ENDIAN) return array.buffer.slice(array.byteOffset, array.byteOffset + array.byteLength);
  const view = new DataView(new ArrayBuffer(array.length * 4));
  array.forEach((v, i) => view.setFloat32(i * 4, v, true));
  return view.buffer;
}

/** Little-endian float32 bytes → Float32Array; refuses a length that is not whole values. */
export function fromFloat32LE(buffer, expectedValues = null) {
  const bytes = buffer instanceof ArrayBuffer ? buffer : buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
  if (bytes.byteLength % 4 !== 0 || (expectedValues != null && bytes.byteLength !== expectedValues * 4)) {
    const want = expectedValues != null ? `${expectedValues * 4} (${expectedValues} float32 values)` : 'a multiple of 4';
    throw new PollinateError('weights-mismatch', `got ${bytes.byteLength} bytes of weights; expected ${want}`);
  }
  if (LITTLE_ENDIAN) return new Float32Array(bytes.slice(0));
  const view = new DataView(bytes);
  return Float32Array.from({ length: bytes.byteLength / 4 }, (_, i) => view.getFloat32(i * 4, true));
}
