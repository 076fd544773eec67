// The fleet's loop: N simulated browsers in one process take turns, one contribute() each per
// pass. Training is serial on purpose: TF.js' backend is global to the process (two fits at
// once would switch it under each other) and one core trains one model fastest; a pass where
// nobody had anything to do sleeps --poll-ms. Kept updates (late, stale) are posted at the
// start of a pass once their moment came, which the federation's /status tells.
//
// It stops when --rounds distinct rounds were seen and a whole pass found nothing to do and
// nothing kept, or at --max-seconds, or on a stop signal (SIGTERM: the simulation is over).
// Stopping, it posts the kept updates whose task no longer takes them (late past the deadline,
// any whose round closed: 409 stale, as they would have been) and reports the rest 'unsent'.

import { drawBehaviour, keepExamples, UsageError } from './fleet-input.mjs';
import { SimulatedBrowser } from './simulated-browser.mjs';

/** The server could not be reached when the fleet started (the CLI exits 3). */
export class Unreachable extends Error {
  constructor(message) {
    super(message);
    this.name = 'Unreachable';
  }
}

const DATA_ERRORS = new Set(['label', 'input-shape', 'input-nonfinite', 'input-type']);
const MODEL_ERRORS = new Set(['no-format', 'model-format', 'integrity', 'not-trainable', 'model-run', 'config']);

function startError(error, id, serverUrl) {
  if (error instanceof UsageError) return error;
  if (DATA_ERRORS.has(error?.code)) return new UsageError(`the examples of ${id} do not fit the model: ${error.message}`);
  if (error?.code === 'network' || (error?.code === 'http' && error.status >= 500)) return new Unreachable(`${serverUrl} did not answer: ${error.message}`);
  if (error?.code === 'http' || MODEL_ERRORS.has(error?.code)) return new UsageError(`cannot load the model: ${error.message}`);
  return error;
}

function sleep(ms, signal) {
  return new Promise(resolve => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

const kb = bytes => `${(bytes / 1024).toFixed(1)} KB`;
const mean = values => (values.length ? values.reduce((a, b) => a + b, 0) / values.length : null);
const round3 = x => (x == null ? null : Math.round(x * 1000) / 1000);

/** One line a person reads for an event. */
export function describe(event) {
  switch (event.event) {
    case 'ready':
      return `${event.devices} browsers ready in ${event.prepare_seconds} s (${event.model} v${event.version}, ${event.examples} examples, TF.js ${event.backend})`;
    case 'round':
      return `round ${event.round}: task ${String(event.task_id).slice(0, 12)} (base v${event.base_version}), deadline ${event.deadline}`;
    case 'held':
      return `${event.device} round ${event.round}: trained in ${event.train_seconds} s, keeps its update (${event.behaviour})`;
    case 'update': {
      const trained = event.train_seconds != null ? `trained ${event.train_seconds} s on ${event.backend}, ` : '';
      const detail = event.detail ? ` (${event.detail})` : '';
      return `${event.device} round ${event.round}: ${event.status}${event.behaviour !== 'normal' ? ` [${event.behaviour}]` : ''}${detail} — ${trained}${event.examples} examples, ${kb(event.bytes_up)} up, ${kb(event.bytes_down)} down`;
    }
    case 'error':
      return `${event.device}: ${event.detail}`;
    case 'done': {
      const s = event.summary;
      const statuses = Object.entries(s.statuses).map(([k, v]) => `${k} ${v}`).join(', ') || 'none';
      return `done (${s.stopped}) after ${s.seconds} s: ${s.updates} updates from ${s.devices} browsers over rounds [${s.rounds}] — ${statuses}; `
        + `train ${s.train_seconds.mean ?? '-'} s mean (max ${s.train_seconds.max ?? '-'}), ${kb(s.bytes_up)} up, ${kb(s.bytes_down)} down`;
    }
    default:
      return JSON.stringify(event);
  }
}

/** Per-status counts, train time and bytes over the update events. */
export function summarise(events, { devices, rounds, stopped, seconds, errors, prepareSeconds }) {
  const updates = events.filter(e => e.event === 'update');
  const count = key => updates.reduce((acc, e) => ({ ...acc, [e[key]]: (acc[e[key]] ?? 0) + 1 }), {});
  const trained = updates.map(e => e.train_seconds).filter(s => s != null);
  const sent = updates.filter(e => e.bytes_up > 0);
  return {
    devices, rounds: [...rounds].sort((a, b) => a - b), stopped, seconds: round3(seconds), prepare_seconds: round3(prepareSeconds),
    updates: updates.length, statuses: count('status'), behaviours: count('behaviour'), errors,
    train_seconds: { count: trained.length, mean: round3(mean(trained)), min: round3(trained.length ? Math.min(...trained) : null), max: round3(trained.length ? Math.max(...trained) : null), total: round3(trained.reduce((a, b) => a + b, 0)) },
    bytes_up: updates.reduce((n, e) => n + e.bytes_up, 0),
    bytes_down: updates.reduce((n, e) => n + e.bytes_down, 0),
    bytes_up_per_sent_update: sent.length ? Math.round(mean(sent.map(e => e.bytes_up))) : null,
    bytes_down_per_update: updates.length ? Math.round(mean(updates.map(e => e.bytes_down))) : null,
    examples: updates.reduce((n, e) => n + (e.examples || 0), 0),
  };
}

/** Posts the kept updates whose moment came (the federation's /status says which); how many. */
async function releaseDue(browsers, newestRound, log) {
  if (!browsers.some(b => b.held.length > 0)) return 0;
  let status = null;
  try {
    status = await browsers[0].client.federationStatus();
  } catch (error) {
    log(`status: ${error.message}`);
  }
  let posted = 0;
  for (const browser of browsers) posted += await browser.release(status, newestRound);
  return posted;
}

/**
 * Runs the fleet; resolves to its summary. `emit(event)` gets every event object (the CLI
 * prints JSON lines), `log(text)` the human lines. `stop` (an AbortSignal) ends it early.
 * Throws UsageError (data that does not fit the model, no such model) or Unreachable before
 * any round work when the browsers cannot load the model.
 */
export async function runFleet(options, data, { tf, emit = () => {}, log = () => {}, stop = null, fetch = globalThis.fetch } = {}) {
  const started = Date.now();
  const halt = new AbortController();
  const timer = setTimeout(() => halt.abort('max-seconds'), options.maxSeconds * 1000);
  const onStop = () => halt.abort(typeof stop.reason === 'string' ? stop.reason : 'signal');
  if (stop?.aborted) onStop();
  stop?.addEventListener('abort', onStop, { once: true });
  const events = [];
  const report = event => {
    events.push(event);
    emit(event);
    log(describe(event));
  };
  const enrolToken = options.enrolToken ?? null;
  const seen = new Map();  // round → the first task of it any browser was given
  const onTask = task => {
    if (!Number.isInteger(task.round) || seen.has(task.round)) return;
    seen.set(task.round, task.taskId);
    report({ event: 'round', round: task.round, task_id: task.taskId, base_version: task.baseVersion, deadline: task.deadlineMs == null ? null : new Date(task.deadlineMs).toISOString() });
  };
  const devices = data.devices.map(device => keepExamples(device, options.maxExamples, options.seed));
  const browsers = devices.map(device => new SimulatedBrowser({
    device, serverUrl: options.server, model: options.model, channel: options.channel, kind: options.kind, enrolToken, tf, fetch,
    behaviourFor: round => drawBehaviour(options, device.id, round, device.behaviour), report, onTask,
  }));
  let errors = 0;
  let stopped = null;
  try {
    for (const browser of browsers) {
      if (halt.signal.aborted) break;
      let contract;
      try {
        contract = await browser.prepare();
      } catch (error) {
        throw startError(error, browser.id, options.server);
      }
      if (contract.shape.join() !== data.inputShape.join()) {
        throw new UsageError(`the data's input_shape [${data.inputShape}] is not ${options.model}'s input shape [${contract.shape}]`);
      }
    }
    const prepareSeconds = (Date.now() - started) / 1000;
    report({ event: 'ready', devices: browsers.length, model: options.model, version: browsers[0].client.version,
      examples: devices.reduce((n, d) => n + d.x.length, 0), backend: tf.getBackend(), prepare_seconds: round3(prepareSeconds) });
    const newest = () => Math.max(0, ...seen.keys());
    for (;;) {
      if (halt.signal.aborted) {
        stopped = String(halt.signal.reason ?? 'signal');
        break;
      }
      let acted = 0;
      let failed = 0;
      acted += await releaseDue(browsers, newest(), log);
      for (const browser of browsers) {
        if (halt.signal.aborted) break;
        const result = await browser.poll(halt.signal);
        if (result.trained) acted += 1;
        if (result.status === 'error') {
          failed += 1;
          errors += 1;
          report({ event: 'error', device: browser.id, detail: String(result.error?.message ?? result.error) });
        }
      }
      const holding = browsers.some(b => b.held.length > 0);
      if (seen.size >= options.rounds && acted === 0 && failed === 0 && !holding && !halt.signal.aborted) {
        stopped = 'rounds';
        break;
      }
      if (acted === 0) await sleep(options.pollMs, halt.signal);
    }
    await releaseDue(browsers, newest(), log);
    for (const browser of browsers) browser.abandon();
    const summary = summarise(events, { devices: browsers.length, rounds: seen.keys(), stopped, seconds: (Date.now() - started) / 1000, errors, prepareSeconds });
    report({ event: 'done', summary });
    return summary;
  } finally {
    clearTimeout(timer);
    stop?.removeEventListener('abort', onStop);
    for (const browser of browsers) await browser.close();
  }
}
