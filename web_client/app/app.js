// The demo page: draw a digit, see the 8×8 input, the prediction, the model's version and
// lineage, and a notice when the server publishes a new version. "Teach it" (app/learn.js):
// correct a prediction (kept in this browser) and, when the user turns it on, help improve
// the model by contributing to the federation's open round.
//
// Query parameters (all optional):
//   model=digits  channel=stable  poll=30000 (ms between update checks; 0 = off)
//   backend=wasm  (force one backend; default: webgl, then wasm, then cpu)
//   threshold=0.5 (below this top probability the page shows "?")   sw=0 (no service worker)
//   contribute=30000 (ms between contribution attempts while "help improve" is on; 0 = only
//   when switched on or after a correction)
//
// Test hook: window.pollinate = {client, ready, offlineReady, drawPixels(values64), clear(),
// predict(), input(), lastResult, timings}. drawPixels paints an 8×8 image (intensities 0..16,
// ink high, row-major) so that reading the canvas back gives those intensities (within 1/255
// of the range); predict() runs what the Predict button runs and resolves to the result;
// timings.readyMs is when the model was ready, in ms since navigation start.
// learning: {start, saveCorrection(), contributeNow(), setOn(bool), state: {count, on, running, last, status}}.
// telemetry: {setOn(bool), flush(), get on, get stats}: the "Share usage counts" switch
// (data-testid=telemetry-optin; off until the user turns it on, remembered). When on, the
// client counts every prediction (docs/monitoring.md) and a saved correction is also sent as
// feedback naming the prediction's id ("it was a 7").

import { createClient } from '../pollinate.js';
import { createPad, renderPreview } from './drawing.js';
import { createLearning } from './learn.js';
import { clientId } from './client-id.js';

const params = new URLSearchParams(location.search);
const settings = {
  model: params.get('model') || 'digits',
  channel: params.get('channel') || 'stable',
  pollMs: params.has('poll') ? Number(params.get('poll')) : 30_000,
  backends: params.get('backend') ? [params.get('backend')] : undefined,
  threshold: params.has('threshold') ? Number(params.get('threshold')) : 0.5,
  serviceWorker: params.get('sw') !== '0',
  contributeMs: params.has('contribute') ? Number(params.get('contribute')) : 30_000,
};

const $ = id => document.getElementById(id);
const els = {
  chip: $('status-chip'), error: $('error-box'), notice: $('update-notice'), noticeText: $('update-text'),
  pad: $('pad'), preview: $('preview'), predict: $('predict'), clear: $('clear'), sample: $('sample'),
  prediction: $('prediction'), confidence: $('confidence'), probabilities: $('probabilities'),
  inference: $('inference-time'), backend: $('backend'), name: $('model-name'), version: $('model-version'),
  channel: $('model-channel'), lineage: $('model-lineage'), accuracy: $('model-accuracy'),
  source: $('model-source'), offline: $('offline-state'), manifestLink: $('manifest-link'),
};


const client = createClient({
  serverUrl: location.origin,
  model: settings.model,
  channel: settings.channel,
  clientId: clientId(),
  backends: settings.backends,
  wasmPaths: new URL('../vendor/tfjs/', import.meta.url).href,
  minConfidence: settings.threshold,
});

const state = { lastResult: null, lastInput: null, samples: null, sampleIndex: 0, predicting: null };

const learning = createLearning(client, {
  correction: $('correction'), save: $('correction-save'), count: $('corrections-count'),
  countLabel: $('corrections-label'), clear: $('corrections-clear'), help: $('help-improve'),
  status: $('contribute-status'), telemetryStatus: $('telemetry-status'),
}, { contributeMs: settings.contributeMs });

// ---- rendering ----------------------------------------------------------------------------------

function setChip(text, kind) {
  els.chip.textContent = text;
  els.chip.dataset.state = kind;
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = !message;
}

export function describeLineage(lineage) {
  if (!lineage) return '–';
  if (lineage.source === 'federated') {
    const parts = [`federated, round ${lineage.round ?? '?'}`];
    if (lineage.parent_version != null) parts.push(`from v${lineage.parent_version}`);
    const strategy = lineage.hyperparameters?.strategy ?? lineage.extra?.strategy;
    if (strategy) parts.push(strategy);
    return parts.join(' · ');
  }
  if (lineage.source === 'central') {
    const epochs = lineage.hyperparameters?.epochs;
    return `central training${epochs ? ` · ${epochs} epochs` : ''}`;
  }
  return lineage.source ?? '–';
}

function renderModel() {
  const info = client.info;
  if (!info) return;
  els.name.textContent = info.name;
  els.version.textContent = `v${info.version}`;
  const cohort = { candidate: ' · staged rollout: this browser is in the candidate cohort', latest: ' · not set yet: the newest version' };
  els.channel.textContent = `${info.channel}${cohort[info.cohort] ?? ''}`;
  els.lineage.textContent = describeLineage(info.lineage);
  const accuracy = info.metrics?.accuracy;
  els.accuracy.textContent = Number.isFinite(accuracy) ? `${(accuracy * 100).toFixed(1)} %` : '–';
  els.backend.textContent = client.backend;
  els.backend.title = client.skippedBackends.length
    ? `Not available here: ${client.skippedBackends.map(s => `${s.name} (${s.reason})`).join('; ')}`
    : '';
  const load = client.lastLoad;
  if (load) {
    const how = load.source === 'network'
      ? `Downloaded ${(load.bytesDownloaded / 1024).toFixed(0)} KB`
      : 'From this browser’s cache';
    const manifest = load.manifestStatus === 304 ? ', manifest revalidated (304)'
      : load.manifestStatus === 'offline' ? ' (server unreachable)' : '';
    els.source.textContent = `${how}${manifest} · sha256 verified`;
  }
  els.manifestLink.href = `/v1/models/${encodeURIComponent(info.name)}/versions/${info.version}/manifest`;
  setChip(client.offline ? `Offline · ${info.name} v${info.version}` : `${info.name} v${info.version} · ${client.backend}`,
    client.offline ? 'offline' : 'ready');
}

function renderResult(result) {
  state.lastResult = result;
  const label = result.label;
  els.prediction.dataset.label = label;
  els.prediction.dataset.version = String(result.version);
  els.prediction.textContent = result.confident ? label : '?';
  const percent = p => (p < 0.001 ? '< 0.1 %' : `${(p * 100).toFixed(p >= 0.995 ? 0 : 1)} %`);
  els.confidence.textContent = result.confident
    ? `${percent(result.top)} sure it is a ${label}.`
    : `Not sure (best guess ${label} at ${percent(result.top)}): try drawing it larger and centred.`;
  els.probabilities.replaceChildren(...result.labels.slice(0, 3).map(({ label: l, probability }) => {
    const li = document.createElement('li');
    li.dataset.label = l;
    li.dataset.probability = String(probability);
    const name = document.createElement('span');
    name.className = 'p-label';
    name.textContent = l;
    const bar = document.createElement('span');
    bar.className = 'p-bar';
    bar.setAttribute('aria-hidden', 'true');
    const fill = document.createElement('span');
    fill.style.width = `${Math.max(1, probability * 100).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement('span');
    value.className = 'p-value';
    value.textContent = percent(probability);
    li.append(name, bar, value);
    return li;
  }));
  els.inference.textContent = `${result.inferenceMs.toFixed(2)} ms`;
  els.backend.textContent = result.backend;
  learning.onResult(result);
}

function clearResult() {
  state.lastResult = null;
  els.prediction.textContent = '–';
  els.prediction.dataset.label = '';
  els.confidence.textContent = 'Draw a digit to see what the model thinks.';
  els.probabilities.replaceChildren();
  els.inference.textContent = '–';
  learning.onClear();
}

// ---- drawing and predicting -------------------------------------------------------------------

const pad = createPad(els.pad, {
  onChange: () => {
    state.lastInput = pad.read();
    renderPreview(els.preview, state.lastInput);
    els.preview.setAttribute('aria-label', state.lastInput
      ? 'The 8 by 8 input the model receives, from your drawing'
      : 'The 8 by 8 input the model receives: empty');
    els.predict.disabled = !state.lastInput || !client.model;
  },
  onStrokeEnd: () => {
    if (client.model) predict().catch(() => {});
  },
});

async function predict() {
  const input = pad.read();
  state.lastInput = input;
  if (!input) {
    clearResult();
    els.confidence.textContent = 'The pad is empty: draw a digit first.';
    return null;
  }
  state.predicting = (async () => {
    try {
      const result = await client.predict(input);
      showError('');
      renderResult(result);
      if (client.telemetryOptedIn()) renderTelemetry();
      return result;
    } catch (error) {
      showError(`Could not predict: ${error.message}`);
      throw error;
    }
  })();
  return state.predicting;
}

function drawPixels(values) {
  const flat = Array.from(values ?? [], Number);
  if (flat.length !== 64 || flat.some(v => !Number.isFinite(v))) {
    throw new Error('drawPixels needs 64 finite intensities (8×8, row-major, 0..16)');
  }
  pad.paintGrid(flat);
  return state.lastInput;
}

async function paintSample() {
  if (!state.samples) {
    const response = await fetch(new URL('./samples.json', import.meta.url));
    state.samples = (await response.json()).samples;
  }
  const sample = state.samples[state.sampleIndex % state.samples.length];
  state.sampleIndex += 1;
  drawPixels(sample.pixels);
  if (client.model) await predict();
  return sample;
}

els.predict.addEventListener('click', () => predict().catch(() => {}));
els.clear.addEventListener('click', () => {
  pad.clear();
  clearResult();
  els.pad.focus?.();
});
els.sample.addEventListener('click', () => paintSample().catch(error => showError(`No sample: ${error.message}`)));
$('update-dismiss').addEventListener('click', () => { els.notice.hidden = true; });

// ---- updates ----------------------------------------------------------------------------------

function showNotice(text, kind) {
  els.noticeText.textContent = text;
  els.notice.dataset.kind = kind;
  els.notice.hidden = false;
}

client.on('available', ({ from, to, manifest }) => {
  showNotice(`New version v${to} available (${describeLineage(manifest.lineage)}): downloading…`, 'available');
});
client.on('updated', ({ from, to, manifest }) => {
  showNotice(`Updated to v${to} (was v${from}): ${describeLineage(manifest.lineage)}. Predictions now use it.`, 'updated');
  renderModel();
  if (state.lastInput) predict().catch(() => {});
});
client.on('error', error => {
  if (error?.code === 'network' || error?.status >= 500) {
    setChip(`Offline · ${client.modelName} v${client.version}`, 'offline');
  } else if (error?.code === 'integrity') {
    showNotice(`A new version was refused: ${error.message}`, 'error');
  }
});

// ---- telemetry (opt-in) -------------------------------------------------------------------------

const telemetryEls = { on: $('telemetry-optin'), status: $('telemetry-status') };

function renderTelemetry() {
  const on = client.telemetryOptedIn();
  telemetryEls.on.checked = on;
  telemetryEls.status.dataset.state = on ? 'on' : 'off';
  if (!on) {
    telemetryEls.status.textContent = 'Off: nothing is sent.';
    return;
  }
  const s = client.telemetryStats;
  const shadow = client.shadow ? ` · v${client.shadow.version} runs silently beside it` : '';
  telemetryEls.status.dataset.batches = String(s.batches + s.beacons);
  telemetryEls.status.textContent = `On: ${s.pending} prediction${s.pending === 1 ? '' : 's'} counted since the last batch, `
    + `${s.batches + s.beacons} batch${s.batches + s.beacons === 1 ? '' : 'es'} sent (${(s.bytesSent / 1024).toFixed(1)} KB)${shadow}.`;
}

async function setTelemetry(on) {
  if (on) await client.optInTelemetry();
  else await client.optOutTelemetry();
  renderTelemetry();
  return client.telemetryOptedIn();
}

telemetryEls.on.addEventListener('change', () => setTelemetry(telemetryEls.on.checked).catch(error => {
  telemetryEls.status.textContent = `Could not switch: ${error.message}`;
}));
client.on('telemetry-error', () => renderTelemetry());

// ---- start ------------------------------------------------------------------------------------

async function registerServiceWorker() {
  if (!settings.serviceWorker || !('serviceWorker' in navigator)) {
    els.offline.textContent = 'Not available in this browser (needs a service worker)';
    return false;
  }
  try {
    await navigator.serviceWorker.register(new URL('../sw.js', import.meta.url), { scope: new URL('../', import.meta.url).pathname });
    await navigator.serviceWorker.ready;
    els.offline.textContent = 'Ready: works without the server';
    return true;
  } catch (error) {
    els.offline.textContent = `Not available (${error.message})`;
    return false;
  }
}

const timings = { startMs: null, readyMs: null };

async function start() {
  timings.startMs = performance.now();
  renderPreview(els.preview, null);
  try {
    await client.load();
    timings.readyMs = performance.now();  // since navigation start: page, TF.js, backend, model
  } catch (error) {
    const hint = error.status === 404 ? ` Publish one first: pollinate train --dataset ${settings.model}.` : '';
    setChip('No model', 'error');
    showError(`Could not load ${settings.model} (${settings.channel}): ${error.message}.${hint}`);
    throw error;
  }
  renderModel();
  els.predict.disabled = !state.lastInput;
  telemetryEls.on.disabled = false;
  renderTelemetry();
  learning.start().catch(error => showError(`Learning is unavailable here: ${error.message}`));
  if (settings.pollMs > 0) {
    client.onUpdate(() => {}, { intervalMs: settings.pollMs, maxIntervalMs: Math.max(settings.pollMs * 16, 60_000) });
  }
  return client.info;
}

const ready = start();
const offlineReady = ready.catch(() => {}).then(registerServiceWorker);

window.pollinate = {
  client,
  ready,
  offlineReady,
  drawPixels,
  clear: () => { pad.clear(); clearResult(); },
  predict,
  timings,
  input: () => state.lastInput,
  get lastResult() {
    return state.lastResult;
  },
  paintSample,
  learning,
  telemetry: {
    setOn: setTelemetry,
    flush: async () => {
      const results = await client.flushTelemetry();
      renderTelemetry();
      return results;
    },
    get on() {
      return client.telemetryOptedIn();
    },
    get stats() {
      return client.telemetryStats;
    },
  },
};
