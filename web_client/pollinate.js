// Pollinate's web client: get the model version the server picks for this client, never
// download the same bytes twice, refuse tampered files, predict locally, and follow new
// versions as they are published. One ES module, no build step; the same code runs in
// browsers and in Node 20.
//
//   import { createClient } from './pollinate.js';
//   const client = createClient({ serverUrl: 'http://127.0.0.1:8000', model: 'digits', channel: 'stable', clientId });
//   await client.load();                      // manifest → files (sha256-checked, cached) → TF.js model
//   client.format, client.modelKind           // e.g. 'tfjs-layers', 'layers' (or 'tfjs-graph', 'graph')
//   const result = await client.predict(pixels);   // raw 8×8 intensities 0..16 (ink high)
//   result.label, result.top, result.labels   // best label, its probability, all labels ranked
//   client.onUpdate(({ from, to }) => ..., { intervalMs: 30_000 });   // polls; switches without reload
//
// Learning on the device (LayersModels only; the examples never leave it):
//   await client.addExample(result.modelInput, '7');   // a correction: kept in IndexedDB
//   await client.train();                     // fine-tunes the loaded model: {backend, lossBefore, lossAfter, examples, seconds}
//   await client.optIn();                     // the user's consent, kept in storage
//   await client.contribute({ signal, onProgress });   // task → train → POST local − base: {status: 'accepted', round, accepted, …}
//
// Watching the model in the field (docs/monitoring.md; off until the user opts in):
//   await client.optInTelemetry();            // consent, kept in storage (or createClient({telemetry: {enabled: true}}))
//   result.id                                 // every prediction's random id
//   await client.feedback({ predictionId: result.id, label: '7' });   // "it was a 7"
//   await client.flushTelemetry();            // counts go every 100 predictions, when the page hides, on close()
//
// Tabular models (the manifest's input.preprocessing.kind is "tabular", e.g. delivery-eta):
//   await client.predict({ distance_km: 2.4, hour: 19, weekday: 4, city: 'berlin', … });   // → {values: [eta], …}
//   await client.predict([row1, row2]);       // an array of rows: an array of results
//
// Hybrid serving (lib/hybrid.js): createClient({ ..., mode: 'auto' }) predicts here and answers
// from the server's POST /v1/models/{name}/predict when the model cannot load on this device
// (no backend, larger than maxModelBytes, a file failing its sha256, a format TF.js cannot
// load); mode 'server' never loads TF.js, 'local' (the default) never asks the server.
//   client.mode                               // 'local' or 'server': the path answering now (after load())
//   client.fallback                           // {code, message}: why 'auto' answers from the server
//   result.path                               // 'local' or 'server': which path gave this answer
//
// TF.js: pass `tf` (the module) or let the client `import('@tensorflow/tfjs')` (Node resolves
// it from node_modules; a page maps the bare name with an import map, see index.html).

import { chooseBackend, DEFAULT_BACKENDS, registerMissingKernels } from './lib/backend.js';
import { defaultCache, IndexedDBCache, MemoryCache } from './lib/cache.js';
import { contribute as contributeOnce } from './lib/contribute.js';
import { InputError, IntegrityError, isUnreachable, PollinateError } from './lib/errors.js';
import { ExampleStore } from './lib/examples.js';
import { chunksUnder, describeFallback, flatOutput, formatBytes, localFailure, MAX_PREDICT_BODY, MODES, nest, predictUrl } from './lib/hybrid.js';
import { inputContract, prepareInput, rankLabels, toProbabilities } from './lib/input.js';
import { sha256Hex } from './lib/integrity.js';
import { Poller } from './lib/poller.js';
import { DeviceProtocol } from './lib/protocol.js';
import { encodeRow, isRow, isRowBatch, isTabular, tabularSpec } from './lib/tabular.js';
import { Telemetry, newPredictionId } from './lib/telemetry.js';
import { classCount, fitOnExamples, trainingBackendFor, withBackend } from './lib/training.js';

export { DEFAULT_BACKENDS, IndexedDBCache, InputError, IntegrityError, MemoryCache, PollinateError, Poller };
export { inputContract, prepareInput, rankLabels } from './lib/input.js';
export { sha256Hex } from './lib/integrity.js';
export { ExampleStore } from './lib/examples.js';
export { MODES } from './lib/hybrid.js';
export { encodeRow, encodeRows, formFields, isRow, isTabular, tabularSpec } from './lib/tabular.js';
export { DeviceProtocol, refusalOf } from './lib/protocol.js';
export { trainingBackendFor } from './lib/training.js';
export { binIndex, featureValues, inputKind, newPredictionId, Telemetry, VersionAggregate } from './lib/telemetry.js';
export { float32LE, fromFloat32LE, l2Norm, weightDelta, weightsInSpecOrder } from './lib/weights.js';

// TF.js formats a version may carry, and the order the client takes them in: the LayersModel
// first (it can also train), else the graph model (what tfjs-layers cannot express: inference
// only). Weight-quantized copies (smaller downloads, slightly different outputs) only when asked
// for: `format: 'tfjs-uint8'` or `preferQuantized: 'float16'|'uint8'`.
export const TFJS_FORMATS = ['tfjs-layers', 'tfjs-graph', 'tfjs-float16', 'tfjs-uint8'];
const DEFAULT_FORMATS = ['tfjs-layers', 'tfjs-graph'];
const KIND_BY_MODEL_FORMAT = { 'layers-model': 'layers', 'graph-model': 'graph' };
const FETCH_LOG_LIMIT = 500;
const now = () => globalThis.performance?.now() ?? Date.now();

/** Creates a client; nothing is fetched until `load()`. */
export function createClient(options) {
  return new PollinateClient(options);
}

async function importTf() {
  const mod = await import('@tensorflow/tfjs');
  return mod.default?.loadLayersModel ? mod.default : mod;
}

function decodePath(path) {
  const last = String(path).split('/').pop();
  try {
    return decodeURIComponent(last);
  } catch {
    return last;
  }
}

function concatBuffers(buffers) {
  const total = buffers.reduce((n, b) => n + b.byteLength, 0);
  const out = new Uint8Array(total);
  let offset = 0;
  for (const b of buffers) {
    out.set(new Uint8Array(b), offset);
    offset += b.byteLength;
  }
  return out.buffer;
}

// (input tensor) => Promise<first output tensor>; the input is disposed. A LayersModel predicts;
// a graph model runs execute(), or executeAsync() when its graph has control flow (a recurrent
// layer's While loop): TF.js says so on the first call, and the client remembers.
function modelRunner(tf, model, kind) {
  const first = out => (Array.isArray(out) ? out[0] : out?.dataId ? out : Object.values(out)[0]);
  const rest = (out, keep) => {
    const all = Array.isArray(out) ? out : out?.dataId ? [out] : Object.values(out);
    tf.dispose(all.filter(t => t !== keep));
  };
  let sync = true;
  return async input => {
    try {
      if (kind === 'layers' || sync) {
        try {
          return tf.tidy(() => first(kind === 'layers' ? model.predict(input) : model.execute(input)));
        } catch (error) {
          if (kind === 'layers' || !/executeAsync/.test(String(error?.message))) throw error;
          sync = false;
        }
      }
      const out = await model.executeAsync(input);
      const keep = first(out);
      rest(out, keep);
      return keep;
    } finally {
      input.dispose();
    }
  };
}

export class PollinateClient {
  /**
   * @param {object} options
   * @param {string} [options.serverUrl]  the Pollinate server's origin (default: the page's origin)
   * @param {string} options.model        model name, e.g. "digits"
   * @param {string} [options.channel]    "stable" (default), "canary", …
   * @param {string} [options.clientId]   a stable id for this device: decides its staged-rollout cohort
   * @param {object} [options.tf]         the @tensorflow/tfjs module (default: imported)
   * @param {string[]} [options.backends] preference order (default webgl, wasm, cpu)
   * @param {string} [options.wasmPaths]  folder (URL) of the tfjs-backend-wasm .wasm files
   * @param {() => Promise<object>} [options.loadWasm] imports @tensorflow/tfjs-backend-wasm (default: import())
   * @param {object} [options.cache]      cache adapter (default: IndexedDB in browsers, memory in Node)
   * @param {typeof fetch} [options.fetch] fetch implementation (default: globalThis.fetch)
   * @param {number} [options.timeoutMs]  per-request timeout (default 30 s)
   * @param {boolean} [options.checkRange] refuse inputs outside the manifest's source_range (default true)
   * @param {number} [options.minConfidence] `result.confident` is top >= this (default 0.5)
   * @param {number} [options.keepVersions] cached versions kept per model (default 2: current + previous)
   * @param {string} [options.format]     load only this TF.js format (e.g. 'tfjs-uint8')
   * @param {string[]} [options.formats]  TF.js formats in order of preference (default tfjs-layers, tfjs-graph)
   * @param {string} [options.preferQuantized] 'float16' or 'uint8': take that weight-quantized format first when offered
   * @param {string} [options.enrolToken] bearer token the server asks for on device enrolment (POLLINATE_ENROL_TOKEN), if any
   * @param {{enabled?: boolean, flushEvery?: number, recentIds?: 'feedback'|'all'}} [options.telemetry] field telemetry (docs/monitoring.md):
   *   enabled true/false decides here (the app asked the user itself); left out, the choice the
   *   user made with optInTelemetry() (kept in storage) decides, and nothing is sent before it.
   *   flushEvery: predictions per version and batch (default 100); recentIds: 'feedback' (default:
   *   a batch lists only the prediction ids feedback() names) or 'all' (every id, for labels that
   *   reach the server another way). Every batch and feedback carries a batch_id kept across its
   *   retries (counted once); the device token of this browser's enrolment goes along, and a
   *   server that takes enrolled devices only (401) gets one enrolment (with enrolToken) first.
   * @param {'local'|'auto'|'server'} [options.mode] where predictions run (default 'local'; see lib/hybrid.js):
   *   'auto' runs locally and answers from the server's predict when the model cannot load here
   * @param {number} [options.maxModelBytes] the most bytes of model files this device takes: a larger
   *   format is not downloaded (mode 'auto': the server answers; 'local': load() fails with 'too-large')
   */
  constructor({
    serverUrl = globalThis.location?.origin, model, channel = 'stable', clientId = null, tf = null,
    backends = DEFAULT_BACKENDS, wasmPaths, loadWasm = () => import('@tensorflow/tfjs-backend-wasm'),
    cache = defaultCache(), fetch = globalThis.fetch?.bind(globalThis), timeoutMs = 30_000,
    checkRange = true, minConfidence = 0.5, keepVersions = 2, format = null, formats = null, preferQuantized = null,
    enrolToken = null, telemetry = null, mode = 'local', maxModelBytes = null,
  } = {}) {
    if (!serverUrl) throw new PollinateError('config', 'serverUrl is required outside a browser page');
    if (typeof model !== 'string' || !/^[a-z0-9][a-z0-9_.-]{0,63}$/.test(model)) {
      throw new PollinateError('config', `model must be a model name (1-64 of a-z 0-9 _ . -), got ${JSON.stringify(model)}`);
    }
    if (!/^[a-z0-9_-]{1,32}$/.test(channel)) throw new PollinateError('config', `channel must match [a-z0-9_-]{1,32}, got ${JSON.stringify(channel)}`);
    if (typeof fetch !== 'function') throw new PollinateError('config', 'no fetch() here: pass options.fetch');
    if (!MODES.includes(mode)) throw new PollinateError('config', `mode must be one of ${MODES.join(', ')}, got ${JSON.stringify(mode)}`);
    if (maxModelBytes != null && !(Number.isFinite(maxModelBytes) && maxModelBytes > 0)) {
      throw new PollinateError('config', `maxModelBytes must be a positive number of bytes, got ${JSON.stringify(maxModelBytes)}`);
    }
    if (preferQuantized != null && !['float16', 'uint8'].includes(preferQuantized)) {
      throw new PollinateError('config', `preferQuantized must be 'float16' or 'uint8', got ${JSON.stringify(preferQuantized)}`);
    }
    let wanted = format != null ? [format] : formats != null ? [...formats] : [...DEFAULT_FORMATS];
    if (preferQuantized && format == null) wanted = [`tfjs-${preferQuantized}`, ...wanted.filter(f => f !== `tfjs-${preferQuantized}`)];
    if (wanted.length === 0 || wanted.some(f => !TFJS_FORMATS.includes(f))) {
      throw new PollinateError('config', `formats must be among ${TFJS_FORMATS.join(', ')}, got ${JSON.stringify(wanted)}`);
    }
    this.formats = wanted;
    this.serverUrl = String(serverUrl).replace(/\/+$/, '');
    this.modelName = model;
    this.channel = channel;
    this.clientId = clientId;
    this.options = { backends: [...backends], wasmPaths, loadWasm, timeoutMs, checkRange, minConfidence, keepVersions, maxModelBytes };
    this.requestedMode = mode;    // 'local', 'auto' or 'server', as asked
    this.mode = null;             // the path answering predictions once loaded: 'local' or 'server'
    this.fallback = null;         // mode 'auto' on the server: {code, message} of the local failure
    this.tfFailure = null;        // TF.js could not start here (no backend, no module): not retried
    this.tabular = null;          // the encoding plan of a tabular model's rows (lib/tabular.js), else null
    this.cache = cache;
    this.fetchImpl = fetch;
    this.tf = tf;
    this.backend = null;          // the TF.js backend in use, once loaded
    this.skippedBackends = [];    // backends tried first that did not work here, with the reason
    this.model = null;            // the TF.js model in use: a tf.LayersModel or a tf.GraphModel
    this.format = null;           // its format in the manifest ('tfjs-layers', 'tfjs-graph', …)
    this.modelKind = null;        // 'layers' (tf.loadLayersModel) or 'graph' (tf.loadGraphModel: inference only)
    this.manifest = null;         // its manifest
    this.etag = null;             // the manifest's ETag, for If-None-Match
    this.offline = false;         // true when the last load/check could not reach the server
    this.lastLoad = null;         // what the last load() or update did: see load()
    this.lastDispose = null;      // the last model freed by an update: {version, numDisposedVariables}
    this.fetchLog = [];           // every request: {kind, url, status, bytes, ms}
    this.bytesReceived = 0;       // response bytes over all requests (fetchLog keeps only the newest)
    this.examples = new ExampleStore(cache, `examples/${encodeURIComponent(this.serverUrl)}/${model}/`);
    this.protocol = new DeviceProtocol({ request: (...args) => this.request(...args), serverUrl: this.serverUrl, model, enrolToken });
    this.telemetry = new Telemetry({
      serverUrl: this.serverUrl, model, clientId, cache, fetch, timeoutMs, flushEvery: telemetry?.flushEvery ?? undefined,
      recentIds: telemetry?.recentIds ?? undefined,
      onError: error => this.emit('telemetry-error', error),
      // the device token this browser keeps from its enrolment (deviceIdentity()) goes with every
      // batch; a server that takes enrolled devices only (401) gets one enrolment, then the retry
      credentials: {
        token: async () => (await this.cacheGet(this.preferenceKey('device')))?.token ?? null,
        renew: async refused => {
          if (refused) await this.forgetDevice();  // the server does not know this token (a new store)
          return (await this.deviceIdentity({ kind: 'browser' })).token;
        },
      },
    });
    this.telemetryChoice = typeof telemetry?.enabled === 'boolean' ? telemetry.enabled : null;
    if (this.telemetryChoice) this.telemetry.enable();
    this.shadow = null;           // the channel's shadow version, run silently beside the served one: {version, model, run, contract, manifest}
    this.shadowError = null;      // why the shadow could not be loaded or run, if it could not
    this.shadowWanted = null;     // the shadow version the served manifest names (with telemetry on)
    this.shadowLoading = null;
    this.listeners = new Map();
    this.inflight = new Set();
    this.queue = Promise.resolve();
    this.poller = null;
    this.closed = false;
  }

  // ---- what is loaded ------------------------------------------------------------------------

  get version() {
    return this.manifest?.version ?? null;
  }

  get labels() {
    return this.manifest?.labels ?? null;
  }

  get lineage() {
    return this.manifest?.lineage ?? null;
  }

  /** Name, version, channel, cohort, lineage, input spec, labels, metrics and backend of the model in use. */
  get info() {
    const m = this.manifest;
    if (!m) return null;
    return {
      name: m.name, version: m.version, channel: m.channel ?? this.channel, cohort: m.cohort ?? null,
      createdAt: m.created_at, lineage: m.lineage, input: m.input, labels: m.labels, metrics: m.metrics,
      backend: this.backend, offline: this.offline, format: this.format, modelKind: this.modelKind,
      mode: this.mode, requestedMode: this.requestedMode, fallback: this.fallback,
      shadowVersion: this.shadow?.version ?? null, telemetry: this.telemetry.enabled,
    };
  }

  // ---- events --------------------------------------------------------------------------------

  /** Subscribes to 'available' ({from, to, manifest}: a new version is downloading), 'updated'
   * ({from, to, manifest}: it is in use), 'error' (a failed background check). Returns off(). */
  on(event, callback) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(callback);
    return () => this.listeners.get(event)?.delete(callback);
  }

  emit(event, payload) {
    for (const callback of this.listeners.get(event) ?? []) {
      try {
        callback(payload);
      } catch (error) {
        if (event !== 'error') this.emit('error', error);
      }
    }
  }

  // ---- HTTP ----------------------------------------------------------------------------------

  manifestUrl() {
    const url = new URL(`/v1/models/${encodeURIComponent(this.modelName)}/manifest`, this.serverUrl + '/');
    url.searchParams.set('channel', this.channel);
    if (this.clientId) url.searchParams.set('client_id', this.clientId);
    return url.href;
  }

  async request(kind, url, init = {}) {
    const started = now();
    const entry = { kind, url, status: null, bytes: 0, ms: 0 };
    this.fetchLog.push(entry);
    if (this.fetchLog.length > FETCH_LOG_LIMIT) this.fetchLog.splice(0, this.fetchLog.length - FETCH_LOG_LIMIT);
    const timeout = globalThis.AbortSignal?.timeout ? AbortSignal.timeout(this.options.timeoutMs) : undefined;
    const signal = init.signal && timeout && AbortSignal.any ? AbortSignal.any([init.signal, timeout]) : init.signal ?? timeout;
    let response;
    try {
      response = await this.fetchImpl(url, { ...init, signal });
    } catch (error) {
      entry.status = 'failed';
      entry.ms = now() - started;
      if (init.signal?.aborted) throw new PollinateError('aborted', `cancelled: ${url}`, { url, cause: init.signal.reason });
      throw new PollinateError('network', `cannot reach ${url}: ${error?.message ?? error}`, { url, cause: error });
    }
    entry.status = response.status;
    if (response.status === 304) {
      entry.ms = now() - started;
      return { response, body: null };
    }
    if (!response.ok) {
      let detail = '';
      try {
        const body = await response.json();
        detail = typeof body?.detail === 'string' ? body.detail : JSON.stringify(body?.detail ?? body);
      } catch { /* not JSON */ }
      entry.ms = now() - started;
      throw new PollinateError('http', `${url} answered ${response.status}${detail ? `: ${detail}` : ''}`, { url, status: response.status, detail });
    }
    let body;
    try {
      body = await response.arrayBuffer();
    } catch (error) {
      entry.status = 'failed';
      throw new PollinateError('network', `reading ${url} failed: ${error?.message ?? error}`, { url, cause: error });
    }
    entry.bytes = body.byteLength;
    entry.ms = now() - started;
    this.bytesReceived += body.byteLength;
    return { response, body };
  }

  /** GET the channel's manifest, conditional on `etag`: {status: 200, manifest, etag} or {status: 304}. */
  async fetchManifest(etag) {
    const headers = { Accept: 'application/json' };
    if (etag) headers['If-None-Match'] = etag;
    // no-store: the browser's HTTP cache must neither answer for the server nor hide its 304
    const { response, body } = await this.request('manifest', this.manifestUrl(), { headers, cache: 'no-store' });
    if (response.status === 304) return { status: 304 };
    let manifest;
    try {
      manifest = JSON.parse(new TextDecoder().decode(body));
    } catch (error) {
      throw new PollinateError('model-format', `the manifest at ${this.manifestUrl()} is not JSON: ${error.message}`);
    }
    if (manifest?.name !== this.modelName || !Number.isInteger(manifest?.version)) {
      throw new PollinateError('model-format', `the manifest at ${this.manifestUrl()} does not describe a version of ${this.modelName}`);
    }
    return { status: 200, manifest, etag: response.headers.get('etag') };
  }

  // ---- cache keys ----------------------------------------------------------------------------

  // Keys name the server too: version numbers are only unique per server.
  pointerKey() {
    return `manifest/${encodeURIComponent(this.serverUrl)}/${this.modelName}/${this.channel}/${encodeURIComponent(this.clientId ?? '')}`;
  }

  filesPrefix() {
    return `model/${encodeURIComponent(this.serverUrl)}/${this.modelName}/`;
  }

  filesKey(version, format) {
    return `${this.filesPrefix()}${version}/${format}`;
  }

  async cacheGet(key) {
    try {
      return await this.cache.get(key);
    } catch (error) {
      this.cacheError = error;
      return undefined;
    }
  }

  async cacheSet(key, value) {
    try {
      await this.cache.set(key, value);
      return true;
    } catch (error) {
      // a full or unavailable cache costs a download next time, never the load itself
      this.cacheError = error;
      return false;
    }
  }

  // ---- files ---------------------------------------------------------------------------------

  /** The TF.js format this client takes from `manifest` (the first of `formats` it offers) and its entry. */
  chooseFormat(manifest, formats = this.formats) {
    for (const format of formats) {
      const entry = manifest.artifacts?.[format];
      if (entry && Array.isArray(entry.files) && entry.files.length > 0) return { format, entry };
    }
    const offered = Object.keys(manifest.artifacts ?? {}).join(', ') || 'none';
    throw new PollinateError('no-format', `${manifest.name} v${manifest.version} has no ${formats.join(' or ')} files (formats: ${offered}): export it with \`pollinate export ${manifest.name} --version ${manifest.version} --formats ${formats[0]}\``);
  }

  formatEntry(manifest) {
    return this.chooseFormat(manifest).entry;
  }

  /** Files of a version, from the cache when every one is there and still hashes right, else downloaded and verified. */
  async obtainFiles(manifest, formats = this.formats) {
    const { format, entry } = this.chooseFormat(manifest, formats);
    const wanted = entry.files;
    const key = this.filesKey(manifest.version, format);
    const cached = await this.cacheGet(key);
    if (cached?.files) {
      const byName = new Map(cached.files.map(f => [f.name, f]));
      const complete = wanted.every(w => byName.get(w.name)?.sha256 === w.sha256);
      if (complete) {
        const started = now();
        const checks = await Promise.all(wanted.map(async w => (await sha256Hex(byName.get(w.name).data)) === w.sha256));
        if (checks.every(Boolean)) {
          return { source: 'cache', files: new Map(wanted.map(w => [w.name, byName.get(w.name).data])), downloads: [], verifyMs: now() - started };
        }
        await this.cache.delete(key).catch(() => {});  // corrupted cache entry: fetch again
      }
    }
    const results = await Promise.all(wanted.map(async w => {
      const url = new URL(w.url, this.serverUrl + '/').href;
      const { body } = await this.request('file', url);
      return { want: w, url, data: body };
    }));
    const started = now();
    for (const { want, url, data } of results) {
      if (Number.isInteger(want.bytes) && data.byteLength !== want.bytes) {
        throw new IntegrityError(`${want.name} of ${manifest.name} v${manifest.version} has ${data.byteLength} bytes, the manifest says ${want.bytes}: refused, nothing cached`, { file: want.name, url });
      }
      const got = await sha256Hex(data);
      if (got !== want.sha256) {
        throw new IntegrityError(`${want.name} of ${manifest.name} v${manifest.version} hashes to sha256 ${got}, the manifest says ${want.sha256}: refused, nothing cached`, { file: want.name, url, expected: want.sha256, actual: got });
      }
    }
    const verifyMs = now() - started;
    const stored = await this.cacheSet(key, {
      model: manifest.name, version: manifest.version, format, storedAt: Date.now(),
      files: results.map(({ want, data }) => ({ name: want.name, sha256: want.sha256, data })),
    });
    return {
      source: 'network', stored, verifyMs,
      files: new Map(results.map(({ want, data }) => [want.name, data])),
      downloads: results.map(({ want, data }) => ({ name: want.name, bytes: data.byteLength })),
    };
  }

  /** {model, kind, format}: the TF.js model built from verified bytes, warmed up. */
  async buildModel(manifest, files, { pickBackend = true } = {}) {
    const tf = this.tf;
    const { format, entry } = this.chooseFormat(manifest);
    const { handler, kind } = await this.modelHandler(manifest, files, format, entry, { pickBackend });
    const model = kind === 'graph' ? await tf.loadGraphModel(handler) : await tf.loadLayersModel(handler);
    const loaded = { model, kind, format, run: modelRunner(tf, model, kind) };
    // one untimed predict compiles kernels (shaders on WebGL) so the first real one is honest
    const contract = inputContract(manifest);
    try {
      const warm = await loaded.run(tf.zeros([1, ...contract.shape]));
      await warm.data();
      warm.dispose();
    } catch (error) {
      model.dispose();
      throw new PollinateError('model-run', `${manifest.name} v${manifest.version} (${format}) does not run on the ${this.backend} backend: ${error?.message ?? error}`, { cause: error });
    }
    return loaded;
  }

  /** {handler, kind}: a tf.io handler over a version's verified files (model.json + shards). */
  async modelHandler(manifest, files, format, entry, { pickBackend = false } = {}) {
    const tf = this.tf;
    const entryName = decodePath(entry.url);
    const jsonBytes = files.get(entryName);
    if (!jsonBytes) throw new PollinateError('model-format', `${manifest.name} v${manifest.version}: ${entryName} is not among its ${format} files`);
    let modelJson;
    try {
      modelJson = JSON.parse(new TextDecoder().decode(jsonBytes));
    } catch (error) {
      throw new PollinateError('model-format', `${entryName} of ${manifest.name} v${manifest.version} is not JSON: ${error.message}`);
    }
    if (!modelJson?.modelTopology || !Array.isArray(modelJson.weightsManifest)) {
      throw new PollinateError('model-format', `${entryName} of ${manifest.name} v${manifest.version} is not a TF.js model (no modelTopology/weightsManifest)`);
    }
    // model.json says which kind it is; the manifest's `kind` (when the server gives one) must agree
    const kind = KIND_BY_MODEL_FORMAT[modelJson.format] ?? (modelJson.modelTopology.node ? 'graph' : 'layers');
    if (entry.kind && entry.kind !== kind) {
      throw new PollinateError('model-format', `${entryName} of ${manifest.name} v${manifest.version} is a ${kind} model; the manifest says ${entry.kind}`);
    }
    if (pickBackend) await this.avoidUnsupportedBackend(manifest, format, entry);
    const weightSpecs = [];
    const buffers = [];
    for (const group of modelJson.weightsManifest) {
      weightSpecs.push(...group.weights);
      for (const path of group.paths) {
        const data = files.get(decodePath(path));
        if (!data) throw new PollinateError('model-format', `${entryName} needs ${path}, which the manifest does not list`);
        buffers.push(data);
      }
    }
    const handler = tf.io.fromMemory({
      modelTopology: modelJson.modelTopology, weightSpecs, weightData: concatBuffers(buffers),
      format: modelJson.format, generatedBy: modelJson.generatedBy, convertedBy: modelJson.convertedBy,
      trainingConfig: modelJson.trainingConfig, userDefinedMetadata: modelJson.userDefinedMetadata,
      signature: modelJson.signature, modelInitializer: modelJson.modelInitializer,
    });
    return { handler, kind };
  }

  /**
   * The manifest names the TF.js backends a format failed verification on (another passed),
   * e.g. TF.js 4.22's wasm cannot run a GRU graph model's loop: moves to the next of
   * `backends` that the format is not refused on, noting why in `skippedBackends`.
   */
  async avoidUnsupportedBackend(manifest, format, entry) {
    const gaps = entry.unsupported_backends;
    if (!gaps || typeof gaps !== 'object' || !Object.hasOwn(gaps, this.backend)) return;
    const why = `${manifest.name} v${manifest.version} (${format}) does not run on ${this.backend}: ${gaps[this.backend]}`;
    const remaining = this.options.backends.filter(b => !Object.hasOwn(gaps, b));
    let chosen;
    try {
      chosen = await chooseBackend(this.tf, { ...this.options, backends: remaining });
    } catch (error) {
      throw new PollinateError('model-run', `${why}; no other backend of ${this.options.backends.join(', ')} works here (${error.message})`, { cause: error });
    }
    this.skippedBackends = [...this.skippedBackends, { name: this.backend, reason: why }, ...chosen.skipped];
    this.backend = chosen.name;
    registerMissingKernels(this.tf, this.backend);
  }

  // ---- load, update --------------------------------------------------------------------------

  serialize(work) {
    const run = this.queue.then(work, work);
    this.queue = run.catch(() => {});
    return run;
  }

  async ensureTf() {
    if (this.closed) throw new PollinateError('closed', 'this client was closed');
    this.tf ??= await importTf();
    if (!this.backend) {
      const chosen = await chooseBackend(this.tf, this.options);
      this.backend = chosen.name;
      this.skippedBackends = chosen.skipped;
      registerMissingKernels(this.tf, this.backend);  // e.g. Einsum on wasm, for graph models
    }
  }

  /**
   * Loads the version the server picks for this client: revalidates the cached manifest
   * (If-None-Match → 304 costs no download), takes the files from the cache when it has
   * them, else downloads and verifies them. Offline (no connection, timeout or 5xx) it
   * falls back to the cached version. Resolves to `lastLoad`:
   * {version, manifestStatus: 200|304|'offline', source: 'cache'|'network',
   *  downloads: [{name, bytes}], bytesDownloaded, ms, verifyMs, path: 'local'|'server', fallback}.
   * Mode 'auto' resolves with path 'server' (and `fallback`, why) when the model cannot load here.
   */
  load() {
    return this.serialize(async () => {
      await this.startTf();
      const started = now();
      const pointer = await this.cacheGet(this.pointerKey());
      let answer;
      try {
        answer = await this.fetchManifest(pointer?.manifest ? pointer.etag : null);
      } catch (error) {
        if (!(isUnreachable(error) && pointer?.manifest)) throw error;
        answer = { status: 'offline', error };
      }
      const manifest = answer.status === 200 ? answer.manifest : pointer.manifest;
      const etag = answer.status === 200 ? answer.etag : pointer.etag;
      const result = await this.activateOrFallback(manifest, etag, { persistPointer: answer.status === 200 });
      this.offline = answer.status === 'offline';
      await this.applyTelemetryChoice();
      this.lastLoad = { ...result, manifestStatus: answer.status, ms: now() - started };
      return this.lastLoad;
    });
  }

  /** ensureTf() unless predictions go to the server: mode 'server' never starts TF.js; 'auto' remembers why it could not. */
  async startTf() {
    if (this.closed) throw new PollinateError('closed', 'this client was closed');
    if (this.requestedMode === 'server' || this.tfFailure) return;
    if (this.requestedMode === 'local') {
      await this.ensureTf();
      return;
    }
    try {
      await this.ensureTf();
    } catch (error) {
      if (this.closed || !localFailure(error)) throw error;
      this.tfFailure = error instanceof PollinateError ? error
        : new PollinateError('tf-unavailable', `TF.js cannot start here: ${error?.message ?? error}`, { cause: error });
    }
  }

  /** activate() in mode 'local'; the server's predict in mode 'server', or in 'auto' when the model cannot load here. */
  async activateOrFallback(manifest, etag, options) {
    if (this.requestedMode === 'server') return this.activateServer(manifest, etag, { ...options, reason: null });
    if (this.requestedMode === 'local') return this.activate(manifest, etag, options);
    if (this.tfFailure) return this.activateServer(manifest, etag, { ...options, reason: this.tfFailure });
    try {
      return await this.activate(manifest, etag, options);
    } catch (error) {
      if (this.closed || !localFailure(error)) throw error;
      return this.activateServer(manifest, etag, { ...options, reason: error });
    }
  }

  /** The server answers this version's predictions: no files, no TF.js model (a local one is freed). */
  async activateServer(manifest, etag, { persistPointer, reason }) {
    const contract = inputContract(manifest);
    const tabular = isTabular(manifest) ? tabularSpec(manifest) : null;
    const previous = { model: this.model, version: this.version };
    this.manifest = manifest;
    this.contract = contract;
    this.tabular = tabular;
    this.etag = etag;
    this.model = null;
    this.runModel = null;
    this.format = null;
    this.modelKind = null;
    this.mode = 'server';
    this.fallback = reason ? describeFallback(reason) : null;
    if (persistPointer) await this.cacheSet(this.pointerKey(), { etag, manifest, storedAt: Date.now() });
    if (previous.model) {
      await Promise.allSettled([...this.inflight]);
      const freed = previous.model.dispose();
      this.lastDispose = { version: previous.version, ...(freed ?? {}) };
    }
    if (reason) this.emit('fallback', { version: manifest.version, ...this.fallback });
    this.syncShadow();
    return { version: manifest.version, path: 'server', fallback: this.fallback, source: 'server', downloads: [], bytesDownloaded: 0, verifyMs: 0 };
  }

  /** Refuses a format larger than maxModelBytes before a byte of it is downloaded. */
  checkModelSize(manifest) {
    const limit = this.options.maxModelBytes;
    if (limit == null) return;
    const { format, entry } = this.chooseFormat(manifest);
    const bytes = formatBytes(entry);
    if (bytes > limit) {
      throw new PollinateError('too-large', `${manifest.name} v${manifest.version} (${format}) is ${bytes} bytes, more than this device takes (maxModelBytes ${limit})`, { bytes, limit });
    }
  }

  /** Files → model → swap in → remember. The old model is freed once no prediction uses it. */
  async activate(manifest, etag, { persistPointer }) {
    inputContract(manifest);  // refuse a manifest without a usable input spec before downloading
    const tabular = isTabular(manifest) ? tabularSpec(manifest) : null;
    if (this.model && manifest.version === this.version) {
      this.manifest = manifest;
      this.etag = etag;
      if (persistPointer) await this.cacheSet(this.pointerKey(), { etag, manifest, storedAt: Date.now() });
      this.syncShadow();
      return { version: manifest.version, path: 'local', source: 'memory', downloads: [], bytesDownloaded: 0, verifyMs: 0 };
    }
    if (!this.tf) throw this.tfFailure ?? new PollinateError('tf-unavailable', 'TF.js is not loaded');
    this.checkModelSize(manifest);
    const obtained = await this.obtainFiles(manifest);
    const loaded = await this.buildModel(manifest, obtained.files);
    const model = loaded.model;
    const previous = { model: this.model, version: this.version };
    this.model = model;
    this.runModel = loaded.run;
    this.format = loaded.format;
    this.modelKind = loaded.kind;
    this.manifest = manifest;
    this.contract = inputContract(manifest);
    this.tabular = tabular;
    this.mode = 'local';
    this.fallback = null;
    this.etag = etag;
    if (persistPointer) await this.cacheSet(this.pointerKey(), { etag, manifest, storedAt: Date.now() });
    if (previous.model && previous.model !== model) {
      await Promise.allSettled([...this.inflight]);
      const freed = previous.model.dispose();  // a GraphModel's dispose() returns nothing
      this.lastDispose = { version: previous.version, ...(freed ?? {}) };
    }
    await this.evict(previous.version);
    this.syncShadow();
    return {
      version: manifest.version, path: 'local', format: loaded.format, kind: loaded.kind, source: obtained.source, downloads: obtained.downloads,
      bytesDownloaded: obtained.downloads.reduce((n, d) => n + d.bytes, 0), verifyMs: obtained.verifyMs,
    };
  }

  /** Drops cached versions of this model other than the current and the previous one. */
  async evict(previousVersion) {
    const keep = this.options.keepVersions;
    if (!(keep > 0)) return;
    try {
      const prefix = this.filesPrefix();
      const protect = [this.version, previousVersion].filter(v => v != null).slice(0, keep);
      if (this.shadowWanted != null) protect.push(this.shadowWanted);  // the shadow's files too
      for (const key of await this.cache.keys(prefix)) {
        const v = Number(key.slice(prefix.length).split('/')[0]);
        if (Number.isInteger(v) && !protect.includes(v)) await this.cache.delete(key);
      }
    } catch (error) {
      this.cacheError = error;
    }
  }

  /**
   * Revalidates the manifest; when the server now picks another version, downloads,
   * verifies and switches to it (no reload) and frees the old model.
   * Resolves to {updated, status: 200|304, from, to}.
   */
  checkForUpdate() {
    if (!this.manifest) return this.load().then(r => ({ updated: true, status: r.manifestStatus, from: null, to: r.version }));
    return this.serialize(async () => {
      await this.startTf();
      const from = this.version;
      const answer = await this.fetchManifest(this.etag);
      this.offline = false;
      if (answer.status === 304) return { updated: false, status: 304, from, to: from };
      if (answer.manifest.version === from) {
        // same version, new answer (e.g. a format was attached): remember it, nothing to load
        this.manifest = answer.manifest;
        this.etag = answer.etag;
        await this.cacheSet(this.pointerKey(), { etag: answer.etag, manifest: answer.manifest, storedAt: Date.now() });
        this.syncShadow();  // e.g. the channel named a shadow version
        return { updated: false, status: 200, from, to: from };
      }
      const started = now();
      this.emit('available', { from, to: answer.manifest.version, manifest: answer.manifest });
      const result = await this.activateOrFallback(answer.manifest, answer.etag, { persistPointer: true });
      this.lastLoad = { ...result, manifestStatus: 200, ms: now() - started };
      this.emit('updated', { from, to: this.version, manifest: this.manifest, lastLoad: this.lastLoad });
      return { updated: true, status: 200, from, to: this.version };
    });
  }

  /**
   * Calls `callback({from, to, manifest})` after each switch to a new version, and starts
   * polling (every intervalMs while the server answers, backing off ×2 up to maxIntervalMs
   * while it does not). Returns off(); polling stops when the last update listener goes.
   */
  onUpdate(callback, pollOptions = {}) {
    const off = this.on('updated', callback);
    this.startPolling(pollOptions);
    return () => {
      off();
      if ((this.listeners.get('updated')?.size ?? 0) === 0) this.stopPolling();
    };
  }

  startPolling(options = {}) {
    if (this.poller?.running) return this.poller;
    this.poller = new Poller(() => this.checkForUpdate(), {
      ...options,
      onError: (error, nextDelayMs) => {
        if (isUnreachable(error)) this.offline = true;
        this.emit('error', Object.assign(error, { nextDelayMs }));
      },
    });
    return this.poller.start();
  }

  stopPolling() {
    this.poller?.stop();
  }

  // ---- predict -------------------------------------------------------------------------------

  /**
   * Predicts one sample. `input`: raw values in the manifest's source range and input shape
   * ([8,8,1], also [8,8] or 64 flat for digits); checked and preprocessed here. A tabular
   * model also takes a row {column: value, …} (lib/tabular.js), or an array of rows (then it
   * resolves to an array of results).
   * Resolves to {label, top, confident, labels: [{label, index, probability}] most likely first,
   * probabilities (label order), inferenceMs, version, backend, path: 'local'|'server'};
   * regressors give {values, ...}. From the server: backend 'server', cache 'hit'|'miss'.
   */
  async predict(input, { checkRange = this.options.checkRange } = {}) {
    if (this.closed) throw new PollinateError('closed', 'this client was closed');
    if (!this.manifest || (this.mode !== 'server' && !this.model)) throw new PollinateError('not-loaded', 'call load() before predict()');
    if (this.tabular && isRowBatch(input)) {
      if (this.mode === 'server') return this.predictOnServer(input, { checkRange });
      const results = [];
      for (const row of input) results.push(await this.predict(row, { checkRange }));
      return results;
    }
    const values = this.modelInput(input, this.contract, this.tabular, { checkRange });
    if (this.mode === 'server') return (await this.predictOnServer([input], { checkRange, encoded: [values] }))[0];
    const { manifest, contract, tf, runModel } = this;
    const id = newPredictionId();
    const job = (async () => {
      const started = now();
      // the backend this ran on: the client's, or the training backend while train()/contribute() run
      const ranOn = tf.getBackend?.() ?? this.backend;
      const output = await runModel(tf.tensor(values, [1, ...contract.shape], 'float32'));
      try {
        const raw = await output.data();
        return { raw, inferenceMs: now() - started, ranOn };
      } finally {
        output.dispose();
      }
    })();
    this.inflight.add(job);
    let raw;
    let inferenceMs;
    let ranOn;
    try {
      ({ raw, inferenceMs, ranOn } = await job);
    } catch (error) {
      this.telemetry.record(manifest, { error: true });  // the model failed to run: an error in the field
      throw error;
    } finally {
      this.inflight.delete(job);
    }
    const base = { id, path: 'local', inferenceMs, version: manifest.version, backend: ranOn, format: this.format, modelKind: this.modelKind, modelInput: values };
    const result = this.shapeResult(raw, base, manifest);
    const output = Array.isArray(manifest.labels) && raw.length !== 1 ? Float32Array.from(result.probabilities) : raw;
    this.telemetry.record(manifest, { input: values, output, latencyMs: inferenceMs, id });
    this.runShadow(input, manifest, result);
    return result;
  }

  /** The model's input for one sample: a tabular row encoded, else raw values checked and preprocessed. */
  modelInput(input, contract, tabular, { checkRange = this.options.checkRange } = {}) {
    if (tabular && isRow(input)) return encodeRow(input, tabular, 0);
    if (isRow(input)) {
      throw new InputError('input-type', `${this.modelName} takes ${contract.size} numbers (shape [${contract.shape}]), not a row of named columns: its input spec is not tabular`);
    }
    return prepareInput(input, contract, { checkRange });
  }

  /** A result object from a model's raw output: values (regressor) or ranked labels (classifier). */
  shapeResult(raw, base, manifest) {
    if (!Array.isArray(manifest.labels)) return { ...base, values: Array.from(raw) };
    const probabilities = toProbabilities(raw);
    const labels = rankLabels(probabilities, manifest.labels);
    const top = labels[0].probability;
    return { ...base, label: labels[0].label, top, confident: top >= this.options.minConfidence, labels, probabilities: Array.from(probabilities) };
  }

  /**
   * The server's predict (POST /v1/models/{name}/predict?channel=…&client_id=…) for samples
   * checked here first (the same InputErrors as the local path): a tabular model's rows go
   * as `rows`, anything else as `inputs` after preprocessing (what the local model would get).
   * Resolves to one result per sample, with path 'server'. Telemetry counts only what ran
   * on the device: the server saw these inputs itself.
   */
  async predictOnServer(samples, { checkRange = this.options.checkRange, encoded = null } = {}) {
    const { manifest, contract, tabular } = this;
    const values = encoded ?? samples.map((sample, i) => {
      if (tabular && isRow(sample)) return encodeRow(sample, tabular, i);
      return this.modelInput(sample, contract, tabular, { checkRange });
    });
    const asRows = tabular && samples.every(isRow);
    const parts = asRows ? samples : values.map(v => nest(v, contract.shape));
    const url = predictUrl(this.serverUrl, this.modelName, this.channel, this.clientId);
    const results = [];
    // one request per chunk that fits the server's body limit (64 KiB): a large batch goes in several
    for (const [from, to] of chunksUnder(parts, MAX_PREDICT_BODY)) {
      const payload = asRows ? { rows: parts.slice(from, to) } : { inputs: parts.slice(from, to) };
      results.push(...await this.postPredict(url, payload, values.slice(from, to), manifest));
    }
    return results;
  }

  async postPredict(url, payload, values, manifest) {
    const started = now();
    let answer;
    let response;
    try {
      let body;
      ({ response, body } = await this.request('predict', url, {
        method: 'POST', headers: { 'Content-Type': 'application/json', Accept: 'application/json' }, body: JSON.stringify(payload),
      }));
      answer = JSON.parse(new TextDecoder().decode(body));
    } catch (error) {
      if (error?.code === 'http' && error.status === 422) {
        throw new InputError('input-server', `the server refused the input: ${error.detail || error.message}`, { status: 422, detail: error.detail });
      }
      if (error instanceof SyntaxError) throw new PollinateError('http', `${url} answered something that is not JSON`, { url });
      throw error;
    }
    const outputs = answer?.outputs;
    if (!Array.isArray(outputs) || outputs.length !== values.length) {
      throw new PollinateError('http', `${url} answered ${Array.isArray(outputs) ? outputs.length : 'no'} outputs for ${values.length} input(s)`, { url });
    }
    const inferenceMs = now() - started;
    const version = Number.isInteger(answer.version) ? answer.version : manifest.version;
    const cache = response.headers.get('x-pollinate-cache');
    return outputs.map((output, i) => this.shapeResult(flatOutput(output), {
      id: newPredictionId(), path: 'server', inferenceMs, version, backend: 'server', format: null, modelKind: null,
      modelInput: values[i], cache,
    }, manifest));
  }

  // ---- telemetry, feedback, shadow (docs/monitoring.md) ------------------------------------------

  /** The user's telemetry choice: the option when given, else the one kept in storage (default off). */
  async applyTelemetryChoice() {
    const on = this.telemetryChoice ?? (await this.cacheGet(this.preferenceKey('telemetry')))?.optedIn === true;
    if (on && !this.telemetry.enabled) this.telemetry.enable();
    if (on) {
      this.telemetry.retrySoon();  // batches a previous page could not send
      this.syncShadow();
    }
    return on;
  }

  /**
   * The user agrees to send telemetry (counts on fixed bins, latency, prediction ids; never an
   * input) and feedback; kept in storage, so it survives reloads. Loads the channel's shadow
   * version, if it names one.
   */
  async optInTelemetry() {
    this.telemetryChoice = true;
    await this.cacheSet(this.preferenceKey('telemetry'), { optedIn: true, at: Date.now() });
    this.telemetry.enable();
    this.telemetry.retrySoon();
    this.syncShadow();
    return true;
  }

  /** Withdraws it: nothing more is counted or sent, what was not sent yet is forgotten, the shadow is freed. */
  async optOutTelemetry() {
    this.telemetryChoice = false;
    await this.cacheSet(this.preferenceKey('telemetry'), { optedIn: false, at: Date.now() });
    await this.telemetry.disable();
    this.syncShadow();
    return false;
  }

  /** Whether telemetry is on for this client now. */
  telemetryOptedIn() {
    return this.telemetry.enabled;
  }

  /** Sends every pending aggregate and the offline queue now; resolves to the batches' answers. */
  flushTelemetry() {
    return this.telemetry.flush();
  }

  /** Counts, batches and bytes sent so far: {batches, feedback, bytesSent, beacons, queued, dropped, lastError, …}. */
  get telemetryStats() {
    return { ...this.telemetry.stats, enabled: this.telemetry.enabled, pending: [...this.telemetry.aggregates.values()].reduce((n, a) => n + a.predictions, 0) };
  }

  /**
   * What the answer really was: `{predictionId, label}` for a prediction of this client
   * (result.id), or `{version, prediction, label}`. Labels are the model's label strings (a
   * class index is turned into its label), numbers for a regressor. Needs the user's telemetry
   * opt-in. Resolves to {sent: true, accepted, window} or {queued: true} (offline: sent later),
   * or {dropped: true, status, error} when the server refused it.
   */
  async feedback({ predictionId = null, version = null, prediction = null, label } = {}) {
    if (!this.telemetry.enabled) throw new PollinateError('not-opted-in', 'feedback is sent only after the user opted in to telemetry (optInTelemetry())');
    if (predictionId != null && (typeof predictionId !== 'string' || !/^[A-Za-z0-9_-]{1,64}$/.test(predictionId))) {
      throw new PollinateError('config', `predictionId must be a prediction's id (result.id), got ${JSON.stringify(predictionId)}`);
    }
    if (predictionId == null && !(Number.isInteger(version) && prediction != null)) {
      throw new PollinateError('config', 'feedback needs {predictionId, label} or {version, prediction, label}');
    }
    const labels = this.labels;
    const asLabel = value => {
      if (Array.isArray(labels)) {
        const text = Number.isInteger(value) && !labels.includes(String(value)) ? labels[value] : String(value);
        if (!labels.includes(text)) throw new PollinateError('label', `${JSON.stringify(value)} is not a label of ${this.modelName} (${labels.join(', ')})`);
        return text;
      }
      const number = Number(value);
      if (!Number.isFinite(number)) throw new PollinateError('label', `a regressor's label is a number, got ${JSON.stringify(value)}`);
      return number;
    };
    return this.telemetry.feedback(
      { predictionId, version, prediction: prediction == null ? null : asLabel(prediction), label: asLabel(label) },
      v => (v === this.version ? this.manifest : null),
    );
  }

  /** Loads, swaps or frees the shadow version the served manifest names (only with telemetry on). */
  syncShadow() {
    // the shadow runs beside a model on this device: none while the server answers
    const named = this.mode !== 'server' && this.telemetry.enabled && this.telemetry.counts(this.manifest) ? this.manifest?.shadow : null;
    const version = Number.isInteger(named?.version) && named.version !== this.version ? named.version : null;
    if (version === this.shadowWanted) return this.shadowLoading ?? Promise.resolve(this.shadow);
    this.shadowWanted = version;
    const old = this.shadow;
    this.shadow = null;
    if (old) Promise.allSettled([...this.inflight]).then(() => old.model.dispose());
    if (version == null) {
      this.shadowLoading = null;
      return Promise.resolve(null);
    }
    const loading = this.loadShadow(version, named.manifest).then(shadow => {
      if (this.shadowWanted !== version || this.closed) {
        shadow.model.dispose();
        return null;
      }
      this.shadow = shadow;
      this.shadowError = null;
      return shadow;
    }, error => {
      this.shadowError = error?.message ?? String(error);
      this.emit('telemetry-error', error);
      return null;
    });
    this.shadowLoading = loading;
    return loading;
  }

  /** Resolves once the shadow version named by the manifest is loaded (or failed: null). */
  shadowReady() {
    return this.shadowLoading ?? Promise.resolve(this.shadow);
  }

  async loadShadow(version, manifestPath) {
    await this.ensureTf();
    const url = new URL(manifestPath ?? `/v1/models/${encodeURIComponent(this.modelName)}/versions/${version}/manifest`, this.serverUrl + '/').href;
    const { body } = await this.request('shadow-manifest', url, { headers: { Accept: 'application/json' } });
    let manifest;
    try {
      manifest = JSON.parse(new TextDecoder().decode(body));
    } catch (error) {
      throw new PollinateError('model-format', `the shadow manifest at ${url} is not JSON: ${error.message}`);
    }
    if (manifest?.name !== this.modelName || manifest?.version !== version) {
      throw new PollinateError('model-format', `the manifest at ${url} does not describe ${this.modelName} v${version}`);
    }
    const contract = inputContract(manifest);
    const obtained = await this.obtainFiles(manifest);
    const loaded = await this.buildModel(manifest, obtained.files, { pickBackend: false });
    return { version, manifest, contract, model: loaded.model, run: loaded.run, format: loaded.format };
  }

  /** Runs the shadow on the same input in the background (its answer is never shown) and counts agreement. */
  runShadow(input, manifest, result) {
    const shadow = this.shadow;
    if (!shadow || !this.telemetry.counts(manifest)) return;
    const job = (async () => {
      const values = isRow(input) && isTabular(shadow.manifest)
        ? encodeRow(input, tabularSpec(shadow.manifest), 0)
        : prepareInput(input, shadow.contract, { checkRange: false });
      const started = now();
      const output = await shadow.run(this.tf.tensor(values, [1, ...shadow.contract.shape], 'float32'));
      let data;
      try {
        data = await output.data();
      } finally {
        output.dispose();
      }
      const latencyMs = now() - started;
      let agreed;
      if (Array.isArray(manifest.labels)) {
        const p = toProbabilities(data);
        agreed = rankLabels(p, manifest.labels)[0].index === result.labels[0].index;
      } else {
        // a regressor agrees within 10 % of the served value (at least 0.1 absolute)
        agreed = Math.abs(data[0] - result.values[0]) <= 0.1 * Math.max(1, Math.abs(result.values[0]));
      }
      this.telemetry.recordShadow(manifest, shadow.version, { agreed, latencyMs });
    })().catch(error => {
      this.shadowError = error?.message ?? String(error);
      this.emit('telemetry-error', error);
    });
    this.inflight.add(job);
    job.finally(() => this.inflight.delete(job));
    this.telemetry.track(job);
  }

  // ---- learning on the device ----------------------------------------------------------------

  /** The class index of `label`: a label of the loaded model ('7') or an index (7). */
  labelIndex(label) {
    const labels = this.labels;
    if (!Array.isArray(labels)) throw new PollinateError('not-trainable', `${this.modelName} has no labels: only classifiers learn from labelled examples`);
    const index = Number.isInteger(label) ? label : labels.indexOf(String(label));
    if (!(index >= 0 && index < labels.length)) {
      throw new PollinateError('label', `${JSON.stringify(label)} is not a label of ${this.modelName} (${labels.join(', ')})`);
    }
    return index;
  }

  /**
   * Keeps a labelled example in this browser (IndexedDB), e.g. a digit the user corrected.
   * `input`: the model's input (result.modelInput), or raw values with {raw: true} (then
   * checked and scaled like predict()'s input); `label`: a label ('7') or a class index.
   * Resolves to the number of examples kept.
   */
  async addExample(input, label, { raw = false } = {}) {
    if (!this.manifest) throw new PollinateError('not-loaded', 'call load() before addExample(): the manifest gives the input spec and the labels');
    const values = raw ? this.modelInput(input, this.contract, this.tabular) : Float32Array.from(input ?? [], Number);
    return this.examples.add(values, this.labelIndex(label), { size: this.contract.size, classes: this.labels.length, version: this.version });
  }

  preferenceKey(name) {
    return `federation/${encodeURIComponent(this.serverUrl)}/${this.modelName}/${name}`;
  }

  /** Records the user's consent to contribute (kept in storage, so it survives reloads). */
  async optIn() {
    await this.cache.set(this.preferenceKey('consent'), { optedIn: true, at: Date.now() });
    return true;
  }

  /** Withdraws consent: contribute() refuses until optIn() again. */
  async optOut() {
    await this.cache.set(this.preferenceKey('consent'), { optedIn: false, at: Date.now() });
    return false;
  }

  /** Whether the user opted in (false when nothing was ever recorded). */
  async optedIn() {
    return (await this.cacheGet(this.preferenceKey('consent')))?.optedIn === true;
  }

  /** {device_id, token}: this browser's enrolment for the model, enrolling once (kept in storage). */
  async deviceIdentity({ signal = null, kind = 'browser', onEnrol = null } = {}) {
    const kept = await this.cacheGet(this.preferenceKey('device'));
    if (kept?.token && kept?.device_id) return kept;
    onEnrol?.();
    const device = await this.protocol.enrol(kind, { signal });
    if (!device?.token || !device?.device_id) throw new PollinateError('http', 'enrolment answered without a device_id and token');
    const identity = { device_id: device.device_id, token: device.token, enrolledAt: Date.now() };
    await this.cacheSet(this.preferenceKey('device'), identity);
    return identity;
  }

  /** Forgets the device token (the next contribution enrols again). */
  async forgetDevice() {
    try {
      await this.cache.delete(this.preferenceKey('device'));
    } catch (error) {
      this.cacheError = error;
    }
  }

  /** Response bytes received so far (every request). */
  bytesDownloaded() {
    return this.bytesReceived;
  }

  /**
   * A fresh LayersModel of `version` (its tfjs-layers files from the cache or downloaded and
   * sha256-checked), built on the current backend: a model to train that the page does not
   * predict with. {model, manifest, source}. A version without tfjs-layers cannot train.
   */
  async loadTrainableModel(version, { signal = null } = {}) {
    await this.ensureTf();
    if (!Number.isInteger(version)) throw new PollinateError('config', `a version number is needed to train, got ${JSON.stringify(version)}`);
    const url = new URL(`/v1/models/${encodeURIComponent(this.modelName)}/versions/${version}/manifest`, this.serverUrl + '/').href;
    const { body } = await this.request('version-manifest', url, { headers: { Accept: 'application/json' }, signal });
    let manifest;
    try {
      manifest = JSON.parse(new TextDecoder().decode(body));
    } catch (error) {
      throw new PollinateError('model-format', `the manifest at ${url} is not JSON: ${error.message}`);
    }
    if (manifest?.name !== this.modelName || manifest?.version !== version) {
      throw new PollinateError('model-format', `the manifest at ${url} does not describe ${this.modelName} v${version}`);
    }
    const entry = manifest.artifacts?.['tfjs-layers'];
    if (!entry?.files?.length) {
      const offered = TFJS_FORMATS.filter(f => manifest.artifacts?.[f]).join(', ') || 'no TF.js format';
      throw new PollinateError('not-trainable', `${this.modelName} v${version} has no tfjs-layers files (${offered}): only a LayersModel trains in TF.js, a graph model is inference only`);
    }
    const obtained = await this.obtainFiles(manifest, ['tfjs-layers']);
    const { handler, kind } = await this.modelHandler(manifest, obtained.files, 'tfjs-layers', entry);
    if (kind !== 'layers') throw new PollinateError('not-trainable', `${this.modelName} v${version}'s tfjs-layers files hold a ${kind} model: only a LayersModel trains`);
    return { model: await this.tf.loadLayersModel(handler), manifest, source: obtained.source };
  }

  /**
   * Fine-tunes the loaded model (a LayersModel) on labelled examples: `examples` as
   * [{input (model input, flat), label (class index or label)}], or null for the ones kept by
   * addExample(). Trains on a backend that can (wasm cannot: cpu then, and back to wasm to
   * predict). Resolves to {backend, inferenceBackend, backendReason, examples, epochs,
   * lossBefore, lossAfter, losses, seconds}.
   */
  train(examples = null, { epochs = 1, batchSize = 32, learningRate = 1e-3, signal = null, onProgress = null, backend = null } = {}) {
    return this.serialize(async () => {
      if (this.closed) throw new PollinateError('closed', 'this client was closed');
      if (!this.model) throw new PollinateError('not-loaded', 'call load() before train()');
      if (this.modelKind !== 'layers') {
        throw new PollinateError('not-trainable', `${this.modelName} v${this.version} is loaded as a graph model (${this.format}), which TF.js cannot train: only a LayersModel (tfjs-layers) trains`);
      }
      classCount(this.model);
      const list = (examples ?? await this.examples.list()).map(e => ({ ...e, label: Number.isInteger(e?.label) ? e.label : this.labelIndex(e?.label) }));
      const inference = this.backend;
      const training = trainingBackendFor(inference, backend);
      const fit = await withBackend(this.tf, training.name, () => fitOnExamples(this.tf, this.model, list, {
        inputShape: this.contract.shape, epochs, batchSize, learningRate, signal,
        onEpoch: e => onProgress?.({ phase: 'train', ...e, backend: training.name }),
      }));
      return { backend: training.name, inferenceBackend: inference, backendReason: training.reason, examples: list.length, ...fit };
    });
  }

  /**
   * Contributes to the open federated round, only when the user opted in (optIn()): enrols
   * once, fetches the task (none open: {status: 'no-task'}), trains the task's base weights
   * on the kept examples and sends local − base. Cancellable with `signal`; `onProgress`
   * gets {phase: 'enrol'|'task'|'download'|'train'|'upload'|'done', round, epoch, epochs, loss, …}.
   * Resolves to {status: 'accepted'|'no-task'|'no-examples'|'duplicate', round, accepted,
   * examples, backend, lossBefore, lossAfter, seconds, bytesUp, bytesDown, …}. See lib/contribute.js.
   */
  contribute(options = {}) {
    return this.serialize(() => {
      if (this.closed) throw new PollinateError('closed', 'this client was closed');
      return contributeOnce(this, options);
    });
  }

  /** The federation's round as the server reports it: {round, open, accepted, refused}. */
  federationStatus({ signal = null } = {}) {
    return this.protocol.status({ signal });
  }

  // ---- housekeeping --------------------------------------------------------------------------

  /** Forgets every cached manifest and file of this model. */
  async clearCache() {
    const server = encodeURIComponent(this.serverUrl);
    const keys = [...await this.cache.keys(this.filesPrefix()), ...await this.cache.keys(`manifest/${server}/${this.modelName}/`)];
    for (const key of keys) await this.cache.delete(key);
    return keys.length;
  }

  /** Stops polling and frees the model's tensors; the client cannot be used afterwards. */
  async close() {
    this.closed = true;
    this.stopPolling();
    await this.queue;
    await Promise.allSettled([...this.inflight]);
    if (this.telemetry.enabled) await this.telemetry.flush().catch(() => {});  // on exit: what is left goes now (or waits in the queue)
    this.telemetry.unlisten();
    this.shadowWanted = null;
    await this.shadowLoading?.catch(() => {});
    this.shadow?.model.dispose();
    this.shadow = null;
    this.model?.dispose();
    this.model = null;
  }
}
