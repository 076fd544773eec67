// What a model accepts, from its manifest's `input` spec, and the checks every input passes
// before the model sees it: the right number of values in the right shape, numbers only,
// finite, inside the source range; then the manifest's preprocessing (x = pixel * scale + offset).

import { InputError } from './errors.js';

/**
 * The input contract of a manifest: shape (one sample, no batch dimension), value count,
 * preprocessing and the range raw values must fall in.
 */
export function inputContract(manifest) {
  const input = manifest?.input ?? {};
  const shape = Array.isArray(input.shape) ? input.shape.map(Number) : null;
  if (!shape || shape.length === 0 || shape.some(d => !Number.isInteger(d) || d <= 0)) {
    throw new InputError('model-format', `the manifest of ${manifest?.name} v${manifest?.version} has no usable input.shape`);
  }
  const pre = input.preprocessing ?? {};
  const scale = Number.isFinite(pre.scale) ? pre.scale : 1;
  const offset = Number.isFinite(pre.offset) ? pre.offset : 0;
  const range = Array.isArray(pre.source_range) && pre.source_range.length === 2 && pre.source_range.every(Number.isFinite)
    ? [Number(pre.source_range[0]), Number(pre.source_range[1])]
    : null;
  return {
    shape,
    size: shape.reduce((a, b) => a * b, 1),
    scale,
    offset,
    range,
    dtype: input.dtype ?? 'float32',
    preprocessing: pre,
  };
}

/** The shape of a (possibly nested) array, or throws when it is ragged or not an array. */
export function shapeOf(value) {
  if (ArrayBuffer.isView(value)) return [value.length];
  if (!Array.isArray(value)) return [];
  const shape = [value.length];
  if (value.length > 0 && (Array.isArray(value[0]) || ArrayBuffer.isView(value[0]))) {
    const inner = shapeOf(value[0]);
    for (let i = 1; i < value.length; i++) {
      const other = shapeOf(value[i]);
      if (other.length !== inner.length || other.some((d, k) => d !== inner[k])) {
        throw new InputError('input-shape', `input is ragged: element 0 has shape [${inner}] but element ${i} has shape [${other}]`);
      }
    }
    shape.push(...inner);
  }
  return shape;
}

function flatten(value, out) {
  if (Array.isArray(value) || ArrayBuffer.isView(value)) {
    for (const item of value) flatten(item, out);
  } else {
    out.push(value);
  }
  return out;
}

const sameShape = (a, b) => a.length === b.length && a.every((d, i) => d === b[i]);

/** Shapes that mean the same single sample: [8,8,1] also as [8,8], [1,8,8,1] or a flat [64]. */
function acceptableShapes(shape, size) {
  const squeezed = [...shape];
  while (squeezed.length > 1 && squeezed[squeezed.length - 1] === 1) squeezed.pop();
  return [shape, squeezed, [1, ...shape], [size]];
}

function position(index, shape) {
  const at = [];
  for (let k = shape.length - 1; k >= 0; k--) {
    at.unshift(index % shape[k]);
    index = Math.floor(index / shape[k]);
  }
  return `[${at.join(', ')}]`;
}

/**
 * Checks one raw sample against the contract and returns the model's input as a
 * Float32Array (preprocessing applied). Throws an InputError naming the first bad value.
 *
 * @param {Array|ArrayBufferView} input raw values in the source range (digits: 0..16, ink high)
 * @param {ReturnType<typeof inputContract>} contract
 * @param {{checkRange?: boolean}} [options] checkRange: refuse values outside source_range (default true)
 */
export function prepareInput(input, contract, { checkRange = true } = {}) {
  if (input == null || (typeof input !== 'object')) {
    throw new InputError('input-type', `input must be an array or typed array of ${contract.size} numbers (shape [${contract.shape}]), got ${input === null ? 'null' : typeof input}`);
  }
  if (typeof input.dataSync === 'function' || typeof input.arraySync === 'function') {
    throw new InputError('input-type', 'pass plain numbers (an array or typed array), not a tf.Tensor: the client checks and preprocesses them itself');
  }
  const shape = shapeOf(input);
  if (!acceptableShapes(contract.shape, contract.size).some(s => sameShape(s, shape))) {
    throw new InputError('input-shape', `input must have shape [${contract.shape}] (${contract.size} values), got shape [${shape}]`,
      { expected: contract.shape, received: shape });
  }
  const flat = ArrayBuffer.isView(input) ? input : flatten(input, []);
  const out = new Float32Array(contract.size);
  const [low, high] = contract.range ?? [-Infinity, Infinity];
  const slack = contract.range ? (high - low) * 1e-6 : 0;
  for (let i = 0; i < contract.size; i++) {
    const v = flat[i];
    if (typeof v !== 'number' && typeof v !== 'bigint') {
      throw new InputError('input-type', `input${position(i, contract.shape)} is ${v === null ? 'null' : typeof v} (${String(v).slice(0, 20)}), not a number`, { index: i });
    }
    const x = Number(v);
    if (!Number.isFinite(x)) {
      throw new InputError('input-nonfinite', `input${position(i, contract.shape)} is ${x}: every value must be finite`, { index: i });
    }
    if (checkRange && (x < low - slack || x > high + slack)) {
      throw new InputError('input-range', `input${position(i, contract.shape)} = ${x} is outside the model's source range [${low}, ${high}]`, { index: i });
    }
    out[i] = x * contract.scale + contract.offset;
  }
  return out;
}

/** Probabilities from a classifier's outputs: as they are when they already sum to 1, else softmax. */
export function toProbabilities(values) {
  let sum = 0;
  let inUnit = true;
  for (const v of values) {
    sum += v;
    if (!(v >= 0 && v <= 1)) inUnit = false;
  }
  if (inUnit && Math.abs(sum - 1) < 1e-3) return Float32Array.from(values);
  const max = Math.max(...values);
  const exps = Array.from(values, v => Math.exp(v - max));
  const total = exps.reduce((a, b) => a + b, 0);
  return Float32Array.from(exps, e => e / total);
}

/** Labels with their probabilities, most likely first (ties keep label order). */
export function rankLabels(probabilities, labels) {
  return Array.from(probabilities, (probability, index) => ({ label: labels?.[index] ?? String(index), index, probability }))
    .sort((a, b) => b.probability - a.probability || a.index - b.index);
}
