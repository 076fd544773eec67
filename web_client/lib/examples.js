// Labelled examples this device keeps for training (e.g. digits the user corrected): they
// never leave the device. Only the weight change they cause is ever sent, and only when the
// user opted in (see contribute() in pollinate.js).
//
// Stored in the same cache adapter as the model files (IndexedDB in a browser, memory in
// Node), one entry per example under `examples/<server>/<model>/`, so a page reload keeps
// them and `clear()` forgets them. Each entry: {input: Float32Array (already in the model's
// input spec: shaped, scaled), label: class index, version, at (ms since epoch)}.

import { PollinateError } from './errors.js';

export const MAX_EXAMPLES = 2000;  // the oldest go first beyond this: a page is not a dataset

export class ExampleStore {
  /**
   * @param {object} cache   a cache adapter (get/set/delete/keys)
   * @param {string} prefix  key prefix, e.g. `examples/<server>/<model>/`
   * @param {{limit?: number}} [options]
   */
  constructor(cache, prefix, { limit = MAX_EXAMPLES } = {}) {
    this.cache = cache;
    this.prefix = prefix;
    this.limit = limit;
    this.sequence = 0;
  }

  /**
   * Keeps one example. `input`: the model's input values (flat, `size` of them, finite);
   * `label`: a class index in [0, classes). Resolves to the number kept.
   */
  async add(input, label, { size = null, classes = null, version = null } = {}) {
    const values = Float32Array.from(input ?? [], Number);
    if (values.length === 0 || (size != null && values.length !== size)) {
      throw new PollinateError('input-shape', `an example needs ${size ?? 'some'} input values, got ${values.length}`);
    }
    if (values.some(v => !Number.isFinite(v))) throw new PollinateError('input-nonfinite', 'an example holds NaN or infinite values');
    if (!Number.isInteger(label) || label < 0 || (classes != null && label >= classes)) {
      throw new PollinateError('label', `an example's label must be a class index in 0..${classes != null ? classes - 1 : 'n'}, got ${JSON.stringify(label)}`);
    }
    // keys sort by time, then by a counter for examples added in the same millisecond
    this.sequence = (this.sequence + 1) % 1e6;
    const key = `${this.prefix}${String(Date.now()).padStart(15, '0')}-${String(this.sequence).padStart(6, '0')}`;
    await this.cache.set(key, { input: values, label, version, at: Date.now() });
    const keys = (await this.cache.keys(this.prefix)).sort();
    for (const old of keys.slice(0, Math.max(0, keys.length - this.limit))) await this.cache.delete(old);
    return Math.min(keys.length, this.limit);
  }

  /** Every kept example, oldest first: [{input: Float32Array, label, version, at}]. */
  async list() {
    const out = [];
    for (const key of (await this.cache.keys(this.prefix)).sort()) {
      const entry = await this.cache.get(key);
      if (entry?.input && Number.isInteger(entry.label)) out.push({ ...entry, input: Float32Array.from(entry.input) });
    }
    return out;
  }

  async count() {
    return (await this.cache.keys(this.prefix)).length;
  }

  /** Forgets every example; resolves to how many there were. */
  async clear() {
    const keys = await this.cache.keys(this.prefix);
    for (const key of keys) await this.cache.delete(key);
    return keys.length;
  }
}
