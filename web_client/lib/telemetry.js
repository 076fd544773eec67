// Telemetry: what the models do in the field, as small mergeable counts, never an input.
//
// docs/monitoring.md is the contract. For every prediction the client computes a few summary
// features of the model input (the same ones the server computed on the training data, with
// the same formulas as registry/profile.py), bins them on the version's grid (the manifest's
// `monitoring` block), and adds one to each bin; likewise the predicted class, its confidence
// and the latency. One aggregate per version; flushed to POST /v1/models/{name}/telemetry every
// `flushEvery` predictions, when the page hides (navigator.sendBeacon) and on close(). A batch
// that cannot be sent waits in a queue (IndexedDB in a browser, memory in Node) and is sent
// later. Each prediction gets a random id, kept a while so a later label ("it was a 7") can
// name it: POST /v1/models/{name}/feedback.
//
// Every batch and every feedback carries a random `batch_id`, made once and kept with it in the
// queue: a retry (an answer lost on the way back) is counted once by the server. When the client
// holds a device token (its enrolment, see lib/contribute.js) it is sent as `Authorization:
// Bearer`; a server that takes telemetry from enrolled devices only (POLLINATE_MONITOR_AUTH=
// device) answers 401 without one, and the client then enrols (or enrols again) once and retries.
//
// Nothing here runs unless the user opted in (see PollinateClient.optInTelemetry()).

import { PollinateError } from './errors.js';

export const DEFAULT_FLUSH_EVERY = 100;
export const MAX_RECENT = 100;          // prediction ids per batch (the server's limit)
export const MAX_BATCH_PREDICTIONS = 10_000;
const KEPT_PREDICTIONS = 1000;          // ids a feedback may name, newest kept
const MAX_QUEUED = 200;                 // batches waiting offline; the oldest go first
const QUEUE_MAX_AGE_MS = 7 * 24 * 3600 * 1000;
const DEFAULT_RETRY_MS = 30_000;
const BEACON_LIMIT = 60_000;            // bytes: browsers cap a page's beacons at 64 KiB in flight

// ---- features --------------------------------------------------------------------------------

/** "image" | "tabular" | "vector": what the input spec's preprocessing says the input is. */
export function inputKind(inputSpec) {
  const kind = inputSpec?.preprocessing?.kind;
  return kind === 'image' || kind === 'tabular' ? kind : 'vector';
}

/** [H, W, C] of an image input: its shape H×W×C (channels averaged) or H×W. */
function imageGeometry(inputSpec, size) {
  const shape = Array.isArray(inputSpec?.shape) ? inputSpec.shape.map(Number) : [size];
  if (shape.length !== 2 && shape.length !== 3) throw new Error(`image inputs must be H×W×C or H×W, got shape [${shape}]`);
  const [h, w, c = 1] = shape;
  if (h * w * c !== size) throw new Error(`an image input of shape [${shape}] has ${h * w * c} values, got ${size}`);
  return [h, w, c];
}

function imageFeatures(x, inputSpec) {
  const [H, W, C] = imageGeometry(inputSpec, x.length);
  const p = new Float64Array(H * W);
  for (let i = 0; i < H * W; i++) {
    let s = 0;
    for (let k = 0; k < C; k++) s += x[i * C + k];
    const v = s / C;
    p[i] = v < 0 ? 0 : v > 1 ? 1 : v;  // NaN stays NaN: the caller counts it as an error
  }
  let S = 0;
  let covered = 0;
  let sx = 0;
  let sy = 0;
  const rows = [0, 0, 0, 0];
  const cols = [0, 0, 0, 0];
  for (let r = 0; r < H; r++) {
    for (let c = 0; c < W; c++) {
      const v = p[r * W + c];
      S += v;
      if (v > 0.5) covered += 1;
      sx += v * c;
      sy += v * r;
      rows[Math.floor((4 * r) / H)] += v;
      cols[Math.floor((4 * c) / W)] += v;
    }
  }
  const out = { ink_mass: S / (H * W), coverage: covered / (H * W) };
  if (S === 0) {
    // no ink: every share is undefined; 0.5 says "nowhere in particular"
    for (const name of ['centroid_x', 'centroid_y', 'spread', 'rows_0', 'rows_1', 'rows_2', 'rows_3', 'cols_0', 'cols_1', 'cols_2', 'cols_3']) out[name] = 0.5;
    return out;
  }
  const cx = sx / S;
  const cy = sy / S;
  let moment = 0;
  for (let r = 0; r < H; r++) {
    for (let c = 0; c < W; c++) moment += p[r * W + c] * ((c - cx) ** 2 + (r - cy) ** 2);
  }
  out.centroid_x = W > 1 ? cx / (W - 1) : 0.5;
  out.centroid_y = H > 1 ? cy / (H - 1) : 0.5;
  out.spread = Math.sqrt(moment / S) / Math.sqrt(H * H + W * W);
  for (let b = 0; b < 4; b++) {
    out[`rows_${b}`] = rows[b] / S;
    out[`cols_${b}`] = cols[b] / S;
  }
  return out;
}

function tabularFeatures(x, inputSpec) {
  const pre = inputSpec?.preprocessing ?? {};
  const names = Array.isArray(pre.features) ? pre.features.map(String) : [];
  const index = new Map(names.map((n, i) => [n, i]));
  const out = {};
  for (const column of pre.columns ?? []) {
    const name = String(column.name);
    if (column.type === 'categorical') {
      const vocabulary = (column.vocabulary ?? []).map(String);
      let best = vocabulary.length;  // "(other)": every one-hot entry is 0
      let bestValue = 0;
      vocabulary.forEach((v, k) => {
        const i = index.get(`${name}=${v}`);
        const value = i === undefined ? 0 : x[i];
        if (value > bestValue) {
          best = k;
          bestValue = value;
        }
      });
      out[name] = best;
    } else {
      const i = index.has(name) ? index.get(name) : -1;
      out[name] = i >= 0 ? x[i] : NaN;
    }
  }
  return out;
}

function vectorFeatures(x) {
  const n = x.length;
  let sum = 0;
  let nonzero = 0;
  for (let i = 0; i < n; i++) {
    sum += x[i];
    if (x[i] !== 0) nonzero += 1;
  }
  const mean = n ? sum / n : 0;
  let squares = 0;
  for (let i = 0; i < n; i++) squares += (x[i] - mean) ** 2;
  return { mean, std: n ? Math.sqrt(squares / n) : 0, nonzero: n ? nonzero / n : 0 };
}

/**
 * The monitoring features of one model input (flat, after preprocessing), as {name: number}:
 * image: ink_mass, coverage, centroid_x/y, spread, rows_0..3, cols_0..3; tabular: one per
 * column (a categorical one as its category index, the vocabulary's length for "(other)");
 * vector: mean, std, nonzero. docs/monitoring.md section 1 gives the formulas.
 */
export function featureValues(x, inputSpec) {
  const values = ArrayBuffer.isView(x) || Array.isArray(x) ? x : Array.from(x ?? []);
  const kind = inputKind(inputSpec);
  if (kind === 'image') return imageFeatures(values, inputSpec);
  if (kind === 'tabular') return tabularFeatures(values, inputSpec);
  return vectorFeatures(values);
}

// ---- bins ------------------------------------------------------------------------------------

/**
 * The bin of `value` on `edges` (K+1 increasing edges = K bins): i with edges[i] <= v <
 * edges[i+1]; below the first edge bin 0, at or above the last bin K-1; -1 when not finite.
 * The same as numpy's clip(searchsorted(edges, v, side="right") - 1, 0, K - 1).
 */
export function binIndex(value, edges) {
  if (!Number.isFinite(value)) return -1;
  let low = 0;
  let high = edges.length;  // count of edges <= value, by binary search
  while (low < high) {
    const mid = (low + high) >> 1;
    if (edges[mid] <= value) low = mid + 1;
    else high = mid;
  }
  return Math.min(Math.max(low - 1, 0), edges.length - 2);
}

/** A random prediction id (32 hex characters): names one prediction, says nothing about it. */
export function newPredictionId() {
  const bytes = new Uint8Array(16);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, b => b.toString(16).padStart(2, '0')).join('');
}

/**
 * A batch's id (docs/monitoring.md): made once per batch, kept across its retries. 32 hex
 * characters, time first (the milliseconds since 1970, 12 digits) then 80 random bits, like a
 * UUIDv7: ids made later sort later, which the server stores at the end of its index (cheaper
 * than random ids scattered through it).
 */
export function newBatchId() {
  return Date.now().toString(16).padStart(12, '0').slice(-12) + newPredictionId().slice(0, 20);
}

function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

// ---- one version's aggregate ------------------------------------------------------------------

/**
 * Counts since the last flush for one version, on its grid. `record()` adds one prediction;
 * `body(clientId)` is the telemetry batch (docs/monitoring.md section 2).
 */
export class VersionAggregate {
  /**
   * @param {number} version
   * @param {object} grid       the manifest's `monitoring` block
   * @param {object} inputSpec  the manifest's `input`
   */
  constructor(version, grid, inputSpec) {
    this.version = version;
    this.grid = grid;
    this.inputSpec = inputSpec;
    this.latencyEdges = grid.latency_ms_edges;
    this.predictions = 0;
    this.errors = 0;
    this.latency = new Array(this.latencyEdges.length - 1).fill(0);
    this.features = {};
    for (const f of grid.features ?? []) {
      this.features[f.name] = new Array(Array.isArray(f.categories) ? f.categories.length : f.edges.length - 1).fill(0);
    }
    const p = grid.prediction ?? {};
    this.task = p.task === 'regression' ? 'regression' : 'classification';
    this.prediction = this.task === 'regression'
      ? { values: new Array(p.edges.length - 1).fill(0) }
      : { classes: new Array(p.labels.length).fill(0), confidence: new Array(p.confidence_edges.length - 1).fill(0) };
    this.shadow = null;
    this.recent = [];
  }

  /**
   * One prediction: `input` the model input (flat), `output` the probabilities (classifier) or
   * the values (regressor), `latencyMs`, `id`; or `{error: true, latencyMs}` for a model that
   * failed to run. Non-finite features or outputs count as an error and are not binned.
   */
  record({ input = null, output = null, latencyMs = null, id = null, error = false }) {
    this.predictions += 1;
    if (Number.isFinite(latencyMs)) this.latency[binIndex(latencyMs, this.latencyEdges)] += 1;
    if (error || !output) {
      this.errors += 1;
      return null;
    }
    let bad = false;
    const values = featureValues(input, this.inputSpec);
    for (const f of this.grid.features ?? []) {
      const v = values[f.name];
      const bin = Array.isArray(f.categories)
        ? (Number.isInteger(v) && v >= 0 && v < f.categories.length ? v : -1)
        : binIndex(v, f.edges);
      if (bin < 0) bad = true;
      else this.features[f.name][bin] += 1;
    }
    let summary;
    if (this.task === 'regression') {
      const value = Number(output[0]);
      const bin = binIndex(value, this.grid.prediction.edges);
      if (bin < 0) bad = true;
      else this.prediction.values[bin] += 1;
      summary = Number.isFinite(value) ? { prediction: value } : null;
    } else {
      let probabilities = Array.from(output, Number);
      const labels = this.grid.prediction.labels;
      if (probabilities.length === 1 && labels.length === 2) probabilities = [1 - probabilities[0], probabilities[0]];  // one sigmoid unit
      if (probabilities.some(v => !Number.isFinite(v))) {
        bad = true;
      } else {
        const cls = argmax(probabilities);
        const top = probabilities[cls];
        this.prediction.classes[cls] += 1;
        this.prediction.confidence[binIndex(top, this.grid.prediction.confidence_edges)] += 1;
        summary = { prediction: String(this.grid.prediction.labels[cls]), confidence: Math.round(top * 1e4) / 1e4 };
      }
    }
    if (bad) this.errors += 1;
    if (id && summary) {
      this.recent.push({ id, ...summary });
      if (this.recent.length > MAX_RECENT) this.recent.shift();
    }
    return summary;
  }

  /** The shadow version ran on the same input: `agreed` its answer matched, in `latencyMs`. */
  recordShadow(shadowVersion, { agreed, latencyMs }) {
    if (!this.shadow || this.shadow.version !== shadowVersion) {
      // one shadow per batch: a new shadow version starts a new comparison
      this.shadow = { version: shadowVersion, compared: 0, agreed: 0, latency_ms: new Array(this.latencyEdges.length - 1).fill(0) };
    }
    this.shadow.compared += 1;
    if (agreed) this.shadow.agreed += 1;
    if (Number.isFinite(latencyMs)) this.shadow.latency_ms[binIndex(latencyMs, this.latencyEdges)] += 1;
  }

  get empty() {
    return this.predictions === 0 && !this.shadow;
  }

  /** The telemetry batch (JSON-ready); `ids` (a Set): only those predictions in `recent` (null: all). */
  body(clientId = null, ids = null) {
    const out = { version: this.version };
    if (clientId) out.client_id = String(clientId).slice(0, 64);
    Object.assign(out, {
      predictions: this.predictions,
      errors: this.errors,
      latency_ms: this.latency,
      features: this.features,
      prediction: this.prediction,
    });
    if (this.shadow && this.shadow.compared <= this.predictions) out.shadow = this.shadow;
    const recent = ids ? this.recent.filter(r => ids.has(r.id)) : this.recent;
    if (recent.length) out.recent = recent;
    return out;
  }
}

// ---- the queue of unsent batches ---------------------------------------------------------------

/** Batches that could not be sent, in the client's cache adapter (IndexedDB or memory), in order. */
export class TelemetryQueue {
  constructor(cache, prefix) {
    this.cache = cache;
    this.prefix = prefix;
    this.sequence = 0;
  }

  async push(item) {
    this.sequence = (this.sequence + 1) % 1e6;
    const key = `${this.prefix}${String(Date.now()).padStart(15, '0')}-${String(this.sequence).padStart(6, '0')}`;
    await this.cache.set(key, { ...item, queuedAt: Date.now() });
    const keys = await this.keys();
    for (const old of keys.slice(0, Math.max(0, keys.length - MAX_QUEUED))) await this.cache.delete(old);
    return key;
  }

  async keys() {
    return (await this.cache.keys(this.prefix)).sort();
  }

  async get(key) {
    return this.cache.get(key);
  }

  async remove(key) {
    await this.cache.delete(key);
  }

  async size() {
    return (await this.keys()).length;
  }

  async clear() {
    for (const key of await this.keys()) await this.cache.delete(key);
  }
}

// ---- the client's telemetry -------------------------------------------------------------------

/**
 * Aggregates, flushes, queues and beacons for one client (one server, one model).
 * `pollinate.js` creates it; an app talks to the client (optInTelemetry(), feedback(), …).
 */
export class Telemetry {
  /**
   * @param {object} options
   * @param {string} options.serverUrl
   * @param {string} options.model
   * @param {string|null} [options.clientId]
   * @param {object} options.cache       cache adapter (the offline queue lives there)
   * @param {typeof fetch} options.fetch
   * @param {number} [options.flushEvery] predictions per version before a flush (default 100)
   * @param {'feedback'|'all'} [options.recentIds] which prediction ids a batch lists in `recent`:
   *   'feedback' (default) only those feedback() names (the batch goes before the feedback);
   *   'all' every one, for labels that reach the server another way (about 12× the bytes)
   * @param {number} [options.timeoutMs]
   * @param {(error: Error) => void} [options.onError]
   * @param {{token: () => Promise<string|null>, renew?: (refused: string|null) => Promise<string|null>}} [options.credentials]
   *   the device token sent with every post (null: none); `renew` is asked once after a 401
   *   (with the token that was refused, or null) and gives the token to retry with
   */
  constructor({ serverUrl, model, clientId = null, cache, fetch, flushEvery = DEFAULT_FLUSH_EVERY, recentIds = 'feedback', timeoutMs = 30_000, onError = null, credentials = null }) {
    if (!['feedback', 'all'].includes(recentIds)) throw new PollinateError('config', `telemetry.recentIds must be 'feedback' or 'all', got ${JSON.stringify(recentIds)}`);
    if (!(Number.isInteger(flushEvery) && flushEvery >= 1 && flushEvery <= MAX_BATCH_PREDICTIONS)) {
      throw new PollinateError('config', `telemetry.flushEvery must be an integer in 1..${MAX_BATCH_PREDICTIONS}, got ${JSON.stringify(flushEvery)}`);
    }
    this.serverUrl = serverUrl;
    this.model = model;
    this.clientId = clientId;
    this.fetchImpl = fetch;
    this.flushEvery = flushEvery;
    this.recentIds = recentIds;
    this.wanted = new Set();       // ids feedback() named before their batch went
    this.timeoutMs = timeoutMs;
    this.onError = onError;
    this.credentials = credentials;
    this.token = null;             // the device token last sent (beacons at page hide need it at once)
    this.enabled = false;
    this.aggregates = new Map();   // version → VersionAggregate
    this.urls = new Map();         // version → {telemetry, feedback}
    this.kept = new Map();         // prediction id → {version, prediction, confidence, sent}
    this.queue = new TelemetryQueue(cache, `telemetry-queue/${encodeURIComponent(serverUrl)}/${model}/`);
    this.retryAt = 0;
    this.sending = Promise.resolve();
    this.pending = new Set();      // background work (flushes, shadow runs) a flush() waits for
    this.stats = { batches: 0, feedback: 0, bytesSent: 0, beacons: 0, queued: 0, dropped: 0, retried: 0, lastError: null, lastWindow: null };
    this.listening = false;
    this.onHide = () => {
      if (globalThis.document?.visibilityState === undefined || globalThis.document.visibilityState === 'hidden') this.beaconAll();
    };
    this.onPageHide = () => this.beaconAll();
    this.onOnline = () => this.retrySoon({ force: true });
  }

  // ---- switch ---------------------------------------------------------------------------------

  enable() {
    this.enabled = true;
    this.listen();
  }

  /** Off: nothing more is counted or sent; what was not sent yet is forgotten. */
  async disable() {
    this.enabled = false;
    this.unlisten();
    this.aggregates.clear();
    this.kept.clear();
    await this.queue.clear();
  }

  listen() {
    if (this.listening) return;
    const doc = globalThis.document;
    const win = globalThis.window;
    if (doc?.addEventListener) doc.addEventListener('visibilitychange', this.onHide);
    if (win?.addEventListener) {
      win.addEventListener('pagehide', this.onPageHide);
      win.addEventListener('online', this.onOnline);
    }
    this.listening = true;
  }

  unlisten() {
    if (!this.listening) return;
    globalThis.document?.removeEventListener?.('visibilitychange', this.onHide);
    globalThis.window?.removeEventListener?.('pagehide', this.onPageHide);
    globalThis.window?.removeEventListener?.('online', this.onOnline);
    this.listening = false;
  }

  track(promise) {
    const p = Promise.resolve(promise).catch(error => this.fail(error));
    this.pending.add(p);
    p.finally(() => this.pending.delete(p));
    return p;
  }

  fail(error) {
    this.stats.lastError = error?.message ?? String(error);
    try {
      this.onError?.(error);
    } catch { /* a listener's problem */ }
  }

  // ---- counting -------------------------------------------------------------------------------

  url(path) {
    return new URL(path, this.serverUrl + '/').href;
  }

  urlsFor(manifest) {
    const grid = manifest.monitoring;
    const base = `/v1/models/${encodeURIComponent(this.model)}`;
    return {
      telemetry: this.url(grid?.telemetry_url ?? `${base}/telemetry`),
      feedback: this.url(grid?.feedback_url ?? `${base}/feedback`),
    };
  }

  /** Whether `manifest`'s version can be counted: telemetry is on and it carries a grid. */
  counts(manifest) {
    const grid = manifest?.monitoring;
    return this.enabled && Array.isArray(grid?.latency_ms_edges) && Boolean(grid?.prediction);
  }

  aggregateFor(manifest) {
    let aggregate = this.aggregates.get(manifest.version);
    if (!aggregate) {
      aggregate = new VersionAggregate(manifest.version, manifest.monitoring, manifest.input);
      this.aggregates.set(manifest.version, aggregate);
      this.urls.set(manifest.version, this.urlsFor(manifest));
    }
    return aggregate;
  }

  /** One prediction of `manifest`'s version (see VersionAggregate.record); flushes at flushEvery. */
  record(manifest, observation) {
    if (!this.counts(manifest)) return null;
    const aggregate = this.aggregateFor(manifest);
    const summary = aggregate.record(observation);
    if (observation.id && summary) this.keep(observation.id, { version: manifest.version, ...summary, counted: false, listed: false });
    if (aggregate.predictions >= this.flushEvery) this.track(this.flushVersion(manifest.version));
    return summary;
  }

  recordShadow(manifest, shadowVersion, comparison) {
    if (!this.counts(manifest)) return;
    this.aggregateFor(manifest).recordShadow(shadowVersion, comparison);
  }

  keep(id, record) {
    this.kept.set(id, record);
    if (this.kept.size > KEPT_PREDICTIONS) this.kept.delete(this.kept.keys().next().value);
  }

  /** What this client remembers of a prediction id: {version, prediction, confidence, counted, listed}. */
  prediction(id) {
    return this.kept.get(id) ?? null;
  }

  // ---- sending --------------------------------------------------------------------------------

  /** The device token to send (null: none), as the credentials give it (their trouble is not ours). */
  async deviceToken() {
    if (!this.credentials?.token) return null;
    try {
      this.token = (await this.credentials.token()) || null;
    } catch {
      this.token = null;
    }
    return this.token;
  }

  /** POST JSON; {ok, status, retryAfterMs, answer} — never throws for HTTP answers. A 401 asks the
   * credentials for a (new) token once and tries again with it. */
  async post(url, body) {
    const token = await this.deviceToken();
    let result = await this.postOnce(url, body, token);
    if (result.status === 401 && this.credentials?.renew) {
      let renewed = null;
      try {
        renewed = (await this.credentials.renew(token)) || null;
      } catch { /* cannot enrol now: the refusal stands */ }
      if (renewed && renewed !== token) {
        this.token = renewed;
        result = await this.postOnce(url, body, renewed);
      }
    }
    return result;
  }

  async postOnce(url, body, token) {
    const text = JSON.stringify(body);
    const timeout = globalThis.AbortSignal?.timeout ? AbortSignal.timeout(this.timeoutMs) : undefined;
    const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await this.fetchImpl(url, {
        method: 'POST', headers, body: text, signal: timeout,
        cache: 'no-store', keepalive: text.length < BEACON_LIMIT,
      });
    } catch (error) {
      return { ok: false, status: 0, retry: true, error: `cannot reach ${url}: ${error?.message ?? error}` };
    }
    let answer = null;
    try {
      answer = await response.json();
    } catch { /* not JSON */ }
    this.stats.bytesSent += text.length;
    if (response.ok) return { ok: true, status: response.status, answer };
    const seconds = Number(response.headers.get('retry-after'));
    const detail = typeof answer?.detail === 'string' ? answer.detail : JSON.stringify(answer?.detail ?? answer);
    return {
      ok: false, status: response.status, answer,
      // no connection, 5xx, 429: try again later; any other 4xx: this batch will never be accepted
      retry: response.status >= 500 || response.status === 429 || response.status === 408,
      retryAfterMs: Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : DEFAULT_RETRY_MS,
      error: `${url} answered ${response.status}${detail ? `: ${detail}` : ''}`,
    };
  }

  /** Takes `version`'s aggregate out (new predictions start a fresh one) and sends it. */
  take(version) {
    const aggregate = this.aggregates.get(version);
    if (!aggregate || aggregate.empty) return null;
    this.aggregates.delete(version);
    const ids = this.recentIds === 'all' ? null : new Set(this.wanted);
    for (const r of aggregate.recent) {
      const kept = this.kept.get(r.id);
      if (!kept) continue;
      kept.counted = true;                        // its batch left
      kept.listed = !ids || ids.has(r.id);        // … naming it (the server can join a label to it)
      this.wanted.delete(r.id);
    }
    // the batch's id is made here, once: the item (and its id) is what the queue keeps and retries
    const body = { ...aggregate.body(this.clientId, ids), batch_id: newBatchId() };
    return { kind: 'telemetry', url: this.urls.get(version).telemetry, body };
  }

  flushVersion(version) {
    const item = this.take(version);
    if (!item) return Promise.resolve(null);
    return this.send(item);
  }

  /** Sends one item after the queue (order: a batch naming an id goes before feedback on it). */
  send(item) {
    const run = this.sending.then(async () => {
      await this.retryQueued();
      if (await this.queue.size() > 0) return this.enqueue(item, 'the queue is waiting');
      return this.deliver(item, null);
    });
    this.sending = run.catch(() => {});
    return run;
  }

  async deliver(item, queuedKey) {
    const result = await this.post(item.url, item.body);
    if (result.ok) {
      if (queuedKey) await this.queue.remove(queuedKey);
      if (item.kind === 'telemetry') {
        this.stats.batches += 1;
        this.stats.lastWindow = result.answer?.window ?? null;
      } else {
        this.stats.feedback += 1;
      }
      return { sent: true, status: result.status, ...result.answer };
    }
    this.fail(new Error(result.error));
    if (!result.retry) {
      if (queuedKey) await this.queue.remove(queuedKey);
      this.stats.dropped += 1;
      return { sent: false, dropped: true, status: result.status, error: result.error };
    }
    this.retryAt = Date.now() + (result.retryAfterMs ?? DEFAULT_RETRY_MS);
    if (!queuedKey) return this.enqueue(item, result.error);
    return { sent: false, queued: true, status: result.status, error: result.error };
  }

  async enqueue(item, why) {
    if (!this.enabled) return { sent: false, dropped: true, error: 'telemetry is off' };
    await this.queue.push(item);
    this.stats.queued += 1;
    return { sent: false, queued: true, error: why };
  }

  /** retryQueued() after whatever is being sent now (never two passes over the queue at once). */
  retrySoon(options = {}) {
    const run = this.sending.then(() => this.retryQueued(options));
    this.sending = run.catch(() => {});
    return this.track(run);
  }

  /** Sends what waits in the queue, oldest first; stops at the first that still cannot go. */
  async retryQueued({ force = false } = {}) {
    if (!force && Date.now() < this.retryAt) return 0;
    let sent = 0;
    for (const key of await this.queue.keys()) {
      const item = await this.queue.get(key);
      if (!item || Date.now() - (item.queuedAt ?? 0) > QUEUE_MAX_AGE_MS) {
        await this.queue.remove(key);
        continue;
      }
      this.stats.retried += 1;
      const result = await this.deliver(item, key);
      if (result.queued) break;
      if (result.sent) sent += 1;
    }
    if (sent) this.retryAt = 0;
    return sent;
  }

  /** Sends every version's aggregate (and the queue first); resolves when all is done. */
  async flush({ force = true } = {}) {
    while (this.pending.size) await Promise.allSettled([...this.pending]);
    if (force) this.retryAt = 0;
    const results = [];
    for (const version of [...this.aggregates.keys()]) {
      const r = await this.flushVersion(version);
      if (r) results.push(r);
    }
    if (results.length === 0) await this.retrySoon();
    else await this.sending;
    return results;
  }

  /**
   * The page is going away: every aggregate leaves now by navigator.sendBeacon (what it refuses is
   * queued). A beacon carries no header, so a client with a device token sends a keep-alive fetch
   * with it instead (it outlives the page the same way).
   */
  beaconAll() {
    if (!this.enabled) return 0;
    const beacon = globalThis.navigator?.sendBeacon?.bind(globalThis.navigator);
    let sent = 0;
    for (const version of [...this.aggregates.keys()]) {
      const item = this.take(version);
      if (!item) continue;
      const text = JSON.stringify(item.body);
      let ok = false;
      if (this.token && text.length < BEACON_LIMIT) {
        ok = true;
        this.track(Promise.resolve().then(() => this.fetchImpl(item.url, {
          method: 'POST', keepalive: true, cache: 'no-store', body: text,
          headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${this.token}` },
        })).then(response => {
          if (!response.ok && (response.status >= 500 || response.status === 429)) throw new Error(`${response.status}`);
        }).catch(() => this.queue.push(item).then(() => { this.stats.queued += 1; })));
      } else if (beacon && text.length < BEACON_LIMIT) {
        try {
          ok = beacon(item.url, new Blob([text], { type: 'application/json' }));
        } catch {
          ok = false;
        }
      }
      if (ok) {
        sent += 1;
        this.stats.beacons += 1;
        this.stats.bytesSent += text.length;
      } else {
        this.track(this.queue.push(item).then(() => { this.stats.queued += 1; }));
      }
    }
    return sent;
  }

  // ---- feedback -------------------------------------------------------------------------------

  /**
   * Sends what the answer really was. With a prediction id this client made, the batch that
   * names it goes first (so the server can join them); the body is {prediction_id, label}.
   * Otherwise {version, prediction, label}. Resolves to {sent, …} or {queued: true} when the
   * server cannot be reached (sent later).
   */
  async feedback({ predictionId = null, version = null, prediction = null, label }, manifestFor) {
    let body;
    let urlVersion = version;
    const kept = predictionId != null ? this.kept.get(predictionId) : null;
    if (kept && kept.counted && !kept.listed) {
      // its batch went without the id: the prediction itself, as this client remembers it
      body = { version: kept.version, prediction: kept.prediction, label };
      urlVersion = kept.version;
    } else if (predictionId != null) {
      if (kept && !kept.counted) {
        this.wanted.add(predictionId);  // its batch goes first, naming it
        await this.flushVersion(kept.version);
      }
      body = { prediction_id: String(predictionId), label };
      urlVersion = kept?.version ?? version;
    } else {
      body = { version, prediction, label };
    }
    body.batch_id = newBatchId();  // kept with the item in the queue: a retried feedback counts once
    const urls = this.urls.get(urlVersion) ?? this.urlsFor(manifestFor(urlVersion) ?? {});
    return this.send({ kind: 'feedback', url: urls.feedback, body });
  }
}
