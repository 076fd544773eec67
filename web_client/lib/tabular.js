// Table rows for tabular models: `{column: value}` → the feature vector the model takes.
//
// A tabular manifest's input spec says how (registry/inputs.py does the same on the server
// and in `pollinate predict`, so every path encodes a row the same way):
//   preprocessing.kind: "tabular"
//   preprocessing.columns: [{name, type: "numeric"} | {name, type: "categorical", vocabulary: [...]}]
//   preprocessing.features: the vector's layout, e.g. ["distance_km", …, "city=amsterdam", …]
//   preprocessing.unknown_category: "all-zero one-hot block" (else an unknown category is refused)
//   preprocessing.normalization: "in-model" (the model scales its own inputs: nothing to do here)
// Numeric columns take numbers or text that reads as one (a form field, a CSV cell); a
// categorical column takes one of its vocabulary (text, or a whole number for a numeric-looking
// category). Every refusal is an InputError naming the row (0-based) and the column.

import { InputError } from './errors.js';

const DECIMAL = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;
const FLOAT32_MAX = 3.4028234663852886e38;

/** True when the manifest (or its input spec) describes table rows. */
export function isTabular(manifestOrInput) {
  const input = manifestOrInput?.input ?? manifestOrInput;
  return input?.preprocessing?.kind === 'tabular';
}

/** A plain object {column: value}: one table row (not an array, typed array or tensor). */
export function isRow(value) {
  if (value == null || typeof value !== 'object' || Array.isArray(value) || ArrayBuffer.isView(value)) return false;
  if (typeof value.dataSync === 'function') return false;
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** An array of rows (at least one, every element a row). */
export function isRowBatch(value) {
  return Array.isArray(value) && value.length > 0 && value.every(isRow);
}

/**
 * The encoding plan of a tabular input spec: {columns: [{name, type, vocabulary?, index | positions}],
 * features, size, unknownIsZero}. Throws an InputError('model-format') when the spec cannot
 * encode a row (a column whose features are missing).
 */
export function tabularSpec(manifestOrInput) {
  const input = manifestOrInput?.input ?? manifestOrInput;
  const pre = input?.preprocessing ?? {};
  if (pre.kind !== 'tabular' || !Array.isArray(pre.columns)) {
    throw new InputError('input-type', 'this model does not take table rows (its input spec is not tabular): pass its input values');
  }
  if (!Array.isArray(pre.features)) throw new InputError('model-format', 'the tabular input spec lists no features');
  const features = pre.features.map(String);
  const index = new Map(features.map((name, i) => [name, i]));
  const columns = pre.columns.map(column => {
    const name = String(column.name);
    if (column.type === 'categorical') {
      const vocabulary = (column.vocabulary ?? []).map(String);
      const positions = new Map(vocabulary.map(v => {
        const at = index.get(`${name}=${v}`);
        if (at === undefined) throw new InputError('model-format', `the tabular input spec has no feature ${JSON.stringify(`${name}=${v}`)}`);
        return [v, at];
      }));
      return { name, type: 'categorical', vocabulary, positions };
    }
    const at = index.get(name);
    if (at === undefined) throw new InputError('model-format', `the tabular input spec has no feature ${JSON.stringify(name)}`);
    return { name, type: 'numeric', index: at };
  });
  const rule = pre.unknown_category;
  return { columns, features, size: features.length, unknownIsZero: typeof rule === 'string' && /zero/i.test(rule) };
}

function asNumber(value) {
  if (typeof value === 'number') return value;
  if (typeof value === 'bigint') return Number(value);
  if (typeof value === 'string') {
    const text = value.trim();
    if (/^[+-]?(inf|infinity|nan)$/i.test(text)) return text.toLowerCase().includes('nan') ? NaN : (text.startsWith('-') ? -Infinity : Infinity);
    return DECIMAL.test(text) ? Number(text) : null;
  }
  return null;  // booleans, null, objects
}

function asCategory(value) {
  if (typeof value === 'string') return value;
  if (typeof value === 'bigint') return String(value);
  if (typeof value === 'number' && Number.isInteger(value)) return String(value);
  return null;
}

const shown = value => (typeof value === 'string' ? JSON.stringify(value) : String(value));

/**
 * One row as the model's feature vector (Float32Array laid out as `features`).
 * `rowIndex` only names the row in errors ("row 3").
 */
export function encodeRow(row, spec, rowIndex = 0) {
  const where = `row ${rowIndex}`;
  if (!isRow(row)) {
    throw new InputError('input-type', `${where}: expected an object {column: value}, got ${Array.isArray(row) ? 'an array' : row === null ? 'null' : typeof row}`, { row: rowIndex });
  }
  const known = new Set(spec.columns.map(c => c.name));
  const names = spec.columns.map(c => c.name).join(', ');
  for (const key of Object.keys(row)) {
    if (!known.has(key)) throw new InputError('input-column', `${where}: unknown column ${JSON.stringify(key)}; the columns are: ${names}`, { row: rowIndex, column: key });
  }
  const out = new Float32Array(spec.size);
  for (const column of spec.columns) {
    const { name } = column;
    if (!Object.hasOwn(row, name) || row[name] === undefined) {
      throw new InputError('input-column', `${where}: missing column ${JSON.stringify(name)}`, { row: rowIndex, column: name });
    }
    const value = row[name];
    if (column.type === 'numeric') {
      const number = asNumber(value);
      if (number === null) {
        throw new InputError('input-type', `${where}, column ${JSON.stringify(name)}: ${shown(value)} is not a number`, { row: rowIndex, column: name });
      }
      if (!Number.isFinite(number) || Math.abs(number) > FLOAT32_MAX) {
        throw new InputError('input-nonfinite', `${where}, column ${JSON.stringify(name)}: ${shown(value)} is not a finite number`, { row: rowIndex, column: name });
      }
      out[column.index] = number;
    } else {
      const category = asCategory(value);
      if (category === null) {
        throw new InputError('input-type', `${where}, column ${JSON.stringify(name)}: ${shown(value)} is not a category (text)`, { row: rowIndex, column: name });
      }
      const at = column.positions.get(category);
      if (at !== undefined) {
        out[at] = 1;
      } else if (!spec.unknownIsZero) {
        throw new InputError('input-category', `${where}, column ${JSON.stringify(name)}: unknown category ${JSON.stringify(category)}; expected one of: ${column.vocabulary.join(', ')}`, { row: rowIndex, column: name });
      }
      // else: an unknown category is an all-zero one-hot block, as the spec says
    }
  }
  return out;
}

/** Rows → one feature vector per row (an array of Float32Array). */
export function encodeRows(rows, spec) {
  if (!Array.isArray(rows)) throw new InputError('input-type', 'rows must be an array of objects {column: value}');
  if (rows.length === 0) throw new InputError('input-shape', 'no rows: pass at least one {column: value} object');
  return rows.map((row, i) => encodeRow(row, spec, i));
}

/**
 * What a form for this model needs, per column: numeric {name, type, min, max, step, value}
 * (from the manifest's monitoring grid when it has one: a feature's first and last bin edges
 * span the training data), categorical {name, type, vocabulary, value}.
 */
export function formFields(manifest) {
  const spec = tabularSpec(manifest);
  const grid = new Map((manifest?.monitoring?.features ?? []).map(f => [String(f.name), f]));
  return spec.columns.map(column => {
    if (column.type === 'categorical') return { name: column.name, type: 'categorical', vocabulary: column.vocabulary, value: column.vocabulary[0] ?? '' };
    const edges = (grid.get(column.name)?.edges ?? []).map(Number).filter(Number.isFinite);
    if (edges.length < 2) return { name: column.name, type: 'numeric', min: null, max: null, step: 'any', value: 0 };
    // whole-number columns (hour, weekday) step by 1; a grid's last edge may sit a hair above
    // the largest value (a point mass), so whole-number bounds are rounded
    const inner = edges.slice(0, -1);
    const whole = inner.every(e => Math.abs(e - Math.round(e)) < 1e-6) && Math.abs(edges.at(-1) - Math.round(edges.at(-1))) < 1e-3;
    const round = v => (whole ? Math.round(v) : Number(v.toPrecision(6)));
    const min = round(edges[0]);
    const max = round(edges.at(-1));
    const middle = round(edges[Math.floor((edges.length - 1) / 2)]);
    return { name: column.name, type: 'numeric', min, max, step: whole ? 1 : 'any', value: middle };
  });
}
