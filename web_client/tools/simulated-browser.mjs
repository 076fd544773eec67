// One simulated browser: a PollinateClient with its own storage (memory, as a fresh profile),
// its own enrolment and consent and its own labelled examples, that contributes through the
// library's contribute() exactly as a page does: GET task, the base version's tfjs-layers
// files (sha256-checked, cached), the task's base weights, fit on the kept examples, POST
// local − base.
//
// What makes it a *simulated* browser sits only in the fetch() it hands the client, at the one
// moment a real browser could misbehave — the upload:
//   normal  the POST goes out as contribute() made it;
//   drop    the tab closes after training: nothing is sent (the contribution is aborted);
//   late    the body is kept and posted after the task's deadline (the server answers 409 stale);
//   stale   the body is kept and posted for the old task once a newer round opened (409 stale).
// Kept bodies are posted later through the same client's DeviceProtocol.sendUpdate() and token.
// A task this browser already trained for (dropped or kept: the server still offers it, since
// nothing of this device's is recorded) is not trained twice: once its task has been read, the
// contribution is aborted at its next request (aborting while the task's body is still being
// read would fail that read instead). Every POST, whatever its fate, becomes one `update` event.

import { createClient, MemoryCache, refusalOf } from '../pollinate.js';

const TASK_PATH = /\/v1\/federations\/[^/]+\/task$/;
const UPDATE_PATH = /\/v1\/federations\/[^/]+\/tasks\/([^/]+)\/updates$/;
// the server refuses once time.time() > deadline; a little more so a late post is surely late
const LATE_MARGIN_MS = 250;
const now = () => globalThis.performance?.now() ?? Date.now();
const round3 = x => (x == null ? null : Math.round(x * 1000) / 1000);

/** {status, detail?, accepted?} of an update POST's answer, in the protocol's refusal names. */
async function outcomeOf(response) {
  let body = {};
  try {
    body = await response.clone().json();
  } catch { /* not JSON */ }
  if (response.ok) return { status: 'accepted', accepted: body?.accepted ?? null };
  const detail = typeof body?.detail === 'string' ? body.detail : JSON.stringify(body?.detail ?? null);
  return { status: outcomeName({ code: 'http', status: response.status, detail }), detail };
}

function outcomeName(error) {
  if (error?.code !== 'http') return 'error';
  return refusalOf(error) ?? (error.status >= 500 ? 'server_error' : `http_${error.status}`);
}

export class SimulatedBrowser {
  /**
   * @param {object} options
   * @param {{id: string, x: Float32Array[], y: (number|string)[]}} options.device
   * @param {(round: number) => string} options.behaviourFor  'normal' | 'late' | 'drop' | 'stale'
   * @param {(event: object) => void} options.report          gets every update and held event
   * @param {(task: object) => void} [options.onTask]          sees each task this browser is given
   * @param {object} options.tf                               the @tensorflow/tfjs module (shared)
   */
  constructor({ device, serverUrl, model, channel = 'stable', kind = 'browser', enrolToken = null, tf, behaviourFor, report, onTask = () => {}, fetch = globalThis.fetch }) {
    this.id = device.id;
    this.device = device;
    this.kind = kind;
    this.behaviourFor = behaviourFor;
    this.report = report;
    this.onTask = onTask;
    this.realFetch = fetch;
    this.tasks = new Map();      // task_id → {taskId, round, deadlineMs, baseVersion}: every task this browser was given
    this.handled = new Set();    // task ids it trained for (sent, dropped or kept)
    this.held = [];              // kept bodies waiting for their moment (late, stale)
    this.releasing = new Set();  // bodies posted now on purpose: the fetch lets them through
    this.uploads = 0;            // uploads contribute() made (whatever became of them)
    this.current = null;         // the AbortController of the contribution in progress
    this.skip = null;            // why the contribution in progress stops at its next request
    this.progress = {};
    this.mark = 0;               // bytes received when the last update event was made
    this.client = createClient({
      serverUrl, model, channel, clientId: device.id, tf, backends: ['cpu'], cache: new MemoryCache(), enrolToken,
      fetch: (url, init) => this.fetch(url, init),
    });
  }

  /** Loads the model as a page does, keeps this device's examples, and opts in. */
  async prepare() {
    await this.client.load();
    for (let i = 0; i < this.device.x.length; i++) await this.client.addExample(this.device.x[i], this.device.y[i]);
    await this.client.optIn();
    return this.client.contract;
  }

  /**
   * One contribute(): polls the task (none: {trained: false}), trains and uploads when there is
   * one it has not trained for. `stop` aborts it (max-seconds, a signal).
   * Resolves to {trained, status?, error?}.
   */
  async poll(stop = null) {
    const controller = new AbortController();
    const onStop = () => controller.abort(stop.reason ?? new Error('the fleet is stopping'));
    if (stop?.aborted) onStop();
    stop?.addEventListener('abort', onStop, { once: true });
    this.current = controller;
    this.skip = null;
    const uploads = this.uploads;
    try {
      const result = await this.client.contribute({ signal: controller.signal, kind: this.kind, onProgress: p => this.onProgress(p) });
      return { trained: this.uploads > uploads, status: result.status };
    } catch (error) {
      const trained = this.uploads > uploads;
      if (error?.code === 'aborted' && !stop?.aborted) return { trained, status: 'aborted' };
      if (error?.code === 'aborted') return { trained, status: 'stopped' };
      return { trained, status: 'error', error };
    } finally {
      stop?.removeEventListener('abort', onStop);
      this.current = null;
    }
  }

  onProgress(p) {
    if (p.phase === 'download') this.progress = {};
    else if (p.phase === 'train' && p.epoch === 0) Object.assign(this.progress, { started: now(), backend: p.backend });
    else if (p.phase === 'train') this.progress.loss = p.loss;
    else if (p.phase === 'upload' && this.progress.started != null) this.progress.seconds = (now() - this.progress.started) / 1000;
  }

  /** Response bytes received since the previous update event (the first one includes the model load). */
  takeBytesDown() {
    const total = this.client.bytesDownloaded();
    const since = total - this.mark;
    this.mark = total;
    return since;
  }

  /** The client's fetch: the network, except at the upload, where the behaviour decides. */
  async fetch(url, init = {}) {
    if (this.skip) {
      const why = this.skip;
      this.skip = null;
      this.current?.abort(why);
    }
    if (init.signal?.aborted) throw init.signal.reason ?? new DOMException('This operation was aborted', 'AbortError');
    const path = new URL(url).pathname;
    const method = String(init.method ?? 'GET').toUpperCase();
    const upload = method === 'POST' ? UPDATE_PATH.exec(path) : null;
    if (upload && !this.releasing.has(init.body)) return this.onUpload(decodeURIComponent(upload[1]), url, init);
    const response = await this.realFetch(url, init);
    if (method === 'GET' && response.status === 200 && TASK_PATH.test(path)) {
      let task = null;
      try {
        task = await response.clone().json();
      } catch { /* contribute() reports a task that is not JSON */ }
      if (task?.task_id) this.noteTask(task);
    }
    return response;
  }

  noteTask(task) {
    const deadlineMs = Date.parse(task.deadline);
    const known = { taskId: task.task_id, round: task.round, deadlineMs: Number.isFinite(deadlineMs) ? deadlineMs : null, baseVersion: task.base_version };
    this.tasks.set(task.task_id, known);
    this.onTask(known);
    if (this.handled.has(task.task_id)) this.skip = new Error(`${this.id} already trained for task ${task.task_id}`);
  }

  async onUpload(taskId, url, init) {
    const task = this.tasks.get(taskId) ?? { taskId, round: null, deadlineMs: null };
    this.handled.add(taskId);
    this.uploads += 1;
    const behaviour = Number.isInteger(task.round) ? this.behaviourFor(task.round) : 'normal';
    const bytes = init.body?.byteLength ?? 0;
    const identity = await this.client.cacheGet(this.client.preferenceKey('device'));
    const record = {
      event: 'update', device: this.id, device_id: identity?.device_id ?? null, kind: this.kind, round: task.round, task_id: taskId, behaviour,
      examples: Number(new URL(url).searchParams.get('examples')), backend: this.progress.backend ?? null,
      train_seconds: round3(this.progress.seconds), loss: this.progress.loss ?? null,
      bytes_up: bytes, bytes_down: this.takeBytesDown(),
    };
    if (behaviour === 'normal') {
      let response;
      try {
        response = await this.realFetch(url, init);
      } catch (error) {
        this.report({ ...record, status: 'error', detail: String(error?.message ?? error) });
        throw error;
      }
      this.report({ ...record, ...(await outcomeOf(response)) });
      return response;
    }
    if (behaviour === 'drop') {
      this.report({ ...record, status: 'dropped', bytes_up: 0 });
    } else {
      this.held.push({ record, task, body: init.body, examples: record.examples, heldAt: Date.now() });
      this.report({ event: 'held', device: this.id, round: task.round, task_id: taskId, behaviour, train_seconds: record.train_seconds });
    }
    const why = new Error(`${this.id} ${behaviour === 'drop' ? 'dropped its update' : `keeps its update (${behaviour})`}`);
    this.current?.abort(why);
    throw why;
  }

  /** Whether a kept update's moment has come: past the deadline (late) or a newer round (stale);
   * either, once its task is closed. `status`: the federation's status (may be null). */
  ready(held, status, nowMs, newestRound) {
    const { round, taskId, deadlineMs } = held.task;
    const newer = Number.isInteger(round) && (newestRound > round || (Number.isInteger(status?.round) && status.round > round));
    const closed = (status?.tasks ?? []).some(t => t.task_id === taskId && t.open === false);
    if (held.record.behaviour === 'late') return newer || closed || (deadlineMs != null && nowMs > deadlineMs + LATE_MARGIN_MS);
    return newer || closed;
  }

  /** Posts the kept updates whose moment has come; resolves to how many it posted. */
  async release(status, newestRound, nowMs = Date.now()) {
    const due = this.held.filter(h => this.ready(h, status, nowMs, newestRound));
    for (const held of due) {
      this.held.splice(this.held.indexOf(held), 1);
      let outcome;
      this.releasing.add(held.body);
      try {
        const { token } = await this.client.deviceIdentity({ kind: this.kind });
        const answer = await this.client.protocol.sendUpdate(token, { task_id: held.task.taskId }, held.body, { examples: held.examples });
        outcome = { status: 'accepted', accepted: answer?.accepted ?? null };
      } catch (error) {
        outcome = { status: outcomeName(error), detail: error?.detail ?? String(error?.message ?? error) };
      } finally {
        this.releasing.delete(held.body);
      }
      this.report({ ...held.record, ...outcome, held_seconds: round3((Date.now() - held.heldAt) / 1000) });
    }
    return due.length;
  }

  /** Kept updates that never found their moment (the fleet stopped first): reported 'unsent'. */
  abandon() {
    for (const held of this.held.splice(0)) this.report({ ...held.record, status: 'unsent', bytes_up: 0, held_seconds: round3((Date.now() - held.heldAt) / 1000) });
  }

  async close() {
    await this.client.close().catch(() => {});
  }
}
