// The try-it page, /try/{name}: a form built from the model's manifest, its prediction in
// this browser (pollinate.js, mode 'auto': the server answers when the model cannot load
// here) and, with "Also predict on the server" (on by default), the server's answer for the
// same row beside it with their difference.
//
// The form: a tabular model gets a number field per numeric column (min and max from the
// training data: the first and last edges of the manifest's monitoring grid; step 1 for
// whole-number columns) and a <select> per categorical column (its vocabulary), each named by
// its column. An image model (digits) links to the drawing pad instead. Any other model gets
// one field for its input values (a JSON array or numbers separated by commas).
//
// Query parameters (all optional): channel=stable  mode=auto|local|server  backend=cpu
// maxModelBytes=N (a smaller limit makes 'auto' ask the server)  server=0 (checkbox off).
// Test hook: window.tryPage = {ready, client, manifest, predict(), last}.

import { createClient, formFields, InputError, isTabular } from '../pollinate.js';
import { clientId } from '../app/client-id.js';

const params = new URLSearchParams(location.search);
const segments = location.pathname.split('/').filter(Boolean);
const modelName = segments[0] === 'try' && segments[1] ? decodeURIComponent(segments[1]) : params.get('model') || '';
const settings = {
  channel: params.get('channel') || 'stable',
  mode: params.get('mode') || 'auto',
  backends: params.get('backend') ? [params.get('backend')] : undefined,
  maxModelBytes: params.has('maxModelBytes') ? Number(params.get('maxModelBytes')) : null,
  alsoServer: params.get('server') !== '0',
};

const $ = id => document.getElementById(id);
const els = {
  title: $('title'), chip: $('status-chip'), error: $('error-box'), imageCard: $('image-card'), canvasLink: $('canvas-link'),
  formCard: $('form-card'), form: $('try-form'), fields: $('fields'), alsoServer: $('also-server'), predict: $('predict'),
  resultCard: $('result-card'), prediction: $('prediction'), note: $('answer-note'), local: $('local-answer'),
  server: $('server-answer'), difference: $('difference'), path: $('path'), name: $('model-name'), version: $('model-version'),
  channel: $('model-channel'), task: $('model-task'), mode: $('model-mode'), manifestLink: $('manifest-link'),
};
els.alsoServer.checked = settings.alsoServer;

const page = { ready: null, client: null, manifest: null, last: null, predict: null };
window.tryPage = page;


function setChip(text, state) {
  els.chip.textContent = text;
  els.chip.dataset.state = state;
}

function showError(message) {
  els.error.textContent = message ?? '';
  els.error.hidden = !message;
}

// ---- the form -----------------------------------------------------------------------------------

function numberField(field) {
  const id = `field-${field.name}`;
  const wrap = document.createElement('div');
  wrap.className = 'field';
  const label = document.createElement('label');
  label.htmlFor = id;
  label.textContent = field.name;
  const input = document.createElement('input');
  Object.assign(input, { type: 'number', id, name: field.name, required: true, step: String(field.step) });
  input.inputMode = 'decimal';
  if (field.min != null) input.min = String(field.min);
  if (field.max != null) input.max = String(field.max);
  input.value = String(field.value);
  input.dataset.kind = 'numeric';
  wrap.append(label, input);
  if (field.min != null) {
    const hint = document.createElement('span');
    hint.className = 'range';
    hint.id = `${id}-range`;
    hint.textContent = `${field.min} – ${field.max}`;
    input.setAttribute('aria-describedby', hint.id);
    wrap.append(hint);
  }
  return wrap;
}

function selectField(field) {
  const id = `field-${field.name}`;
  const wrap = document.createElement('div');
  wrap.className = 'field';
  const label = document.createElement('label');
  label.htmlFor = id;
  label.textContent = field.name;
  const select = document.createElement('select');
  Object.assign(select, { id, name: field.name, required: true });
  select.dataset.kind = 'categorical';
  for (const value of field.vocabulary) select.append(new Option(value, value));
  select.value = field.value;
  wrap.append(label, select);
  return wrap;
}

function vectorField(manifest) {
  const shape = manifest.input?.shape ?? [];
  const size = shape.reduce((a, b) => a * b, 1);
  const wrap = document.createElement('div');
  wrap.className = 'field wide';
  const label = document.createElement('label');
  label.htmlFor = 'field-inputs';
  label.textContent = `Input values (${size}, shape [${shape.join(', ')}])`;
  const area = document.createElement('textarea');
  Object.assign(area, { id: 'field-inputs', name: 'inputs', rows: 3, required: true });
  area.value = new Array(size).fill(0).join(', ');
  wrap.append(label, area);
  return wrap;
}

/** The form's sample: a row {column: value} (numbers as numbers), or the input values. */
function readSample() {
  if (!isTabular(page.manifest)) {
    const text = els.form.elements.inputs.value.trim();
    return text.startsWith('[') ? JSON.parse(text) : text.split(/[\s,]+/).filter(Boolean).map(Number);
  }
  const row = {};
  for (const element of els.fields.querySelectorAll('input, select')) {
    const value = element.value;
    row[element.name] = element.dataset.kind === 'numeric' && value.trim() !== '' ? Number(value) : value;
  }
  return row;
}

function markInvalid(column) {
  for (const element of els.fields.querySelectorAll('input, select, textarea')) {
    if (element.name === column) element.setAttribute('aria-invalid', 'true');
    else element.removeAttribute('aria-invalid');
  }
}

// ---- answers ------------------------------------------------------------------------------------

const isClassifier = () => Array.isArray(page.manifest?.labels);

function describe(result) {
  if (!result) return '–';
  if (isClassifier()) return `${result.label} (${(result.top * 100).toFixed(1)} %)`;
  return result.values.length === 1 ? result.values[0].toFixed(3) : result.values.map(v => v.toFixed(3)).join(', ');
}

function difference(a, b) {
  if (!a || !b) return null;
  const x = isClassifier() ? a.probabilities : a.values;
  const y = isClassifier() ? b.probabilities : b.values;
  return x.reduce((m, v, i) => Math.max(m, Math.abs(v - y[i])), 0);
}

function render({ local, server, serverError }) {
  const main = local ?? server;
  els.resultCard.hidden = false;
  els.prediction.textContent = describe(main);
  els.prediction.dataset.value = main ? String(isClassifier() ? main.label : main.values[0]) : '';
  els.prediction.dataset.path = main?.path ?? '';
  els.prediction.dataset.version = main ? String(main.version) : '';
  els.note.textContent = main.path === 'server'
    ? `v${main.version}, answered by the server in ${main.inferenceMs.toFixed(1)} ms.`
    : `v${main.version}, computed in this browser (${main.backend}) in ${main.inferenceMs.toFixed(2)} ms.`;
  els.local.textContent = local?.path === 'local' ? describe(local) : `– (${page.client.fallback?.message ?? 'not run in this browser'})`;
  els.local.dataset.value = local?.path === 'local' ? String(isClassifier() ? local.label : local.values[0]) : '';
  els.server.textContent = server ? `${describe(server)}${server.cache ? ` · cache ${server.cache}` : ''}`
    : serverError ? `failed: ${serverError}` : '– (off)';
  els.server.dataset.value = server ? String(isClassifier() ? server.label : server.values[0]) : '';
  const diff = local?.path === 'local' && server ? difference(local, server) : null;
  els.difference.textContent = diff == null ? '–' : diff === 0 ? '0 (identical)' : diff.toExponential(2);
  els.difference.dataset.value = diff == null ? '' : String(diff);
  els.path.textContent = main.path === 'server'
    ? (page.client.fallback ? `the server: this browser cannot load the model (${page.client.fallback.message})` : 'the server')
    : 'this browser';
  els.path.dataset.path = main.path;
}

async function predict() {
  showError('');
  markInvalid(null);
  const { client } = page;
  let sample;
  try {
    sample = readSample();
  } catch (error) {
    showError(`The input values are not numbers: ${error.message}`);
    throw error;
  }
  els.predict.disabled = true;
  try {
    let local;
    try {
      local = await client.predict(sample);
    } catch (error) {
      if (error instanceof InputError && error.column) markInvalid(error.column);
      showError(error.message);
      throw error;
    }
    let server = local.path === 'server' ? local : null;
    let serverError = null;
    if (!server && els.alsoServer.checked) {
      try {
        [server] = await client.predictOnServer([sample]);
      } catch (error) {
        serverError = error.message;
      }
    }
    const shown = { local: local.path === 'local' ? local : null, server, serverError };
    render({ ...shown, local: shown.local ?? local });
    page.last = shown;
    return shown;
  } finally {
    els.predict.disabled = false;
  }
}
page.predict = predict;

// ---- start --------------------------------------------------------------------------------------

async function fetchManifest() {
  const url = new URL(`/v1/models/${encodeURIComponent(modelName)}/manifest`, location.origin);
  url.searchParams.set('channel', settings.channel);
  const id = clientId();
  if (id) url.searchParams.set('client_id', id);
  const response = await fetch(url, { headers: { Accept: 'application/json' }, cache: 'no-store' });
  if (!response.ok) {
    let detail = '';
    try {
      detail = (await response.json()).detail;
    } catch { /* not JSON */ }
    throw new Error(response.status === 404 ? `No model named “${modelName}” on this server${detail ? ` (${detail})` : ''}.`
      : `The manifest of ${modelName} answered ${response.status}${detail ? `: ${detail}` : ''}.`);
  }
  return response.json();
}

function renderModel(manifest) {
  document.title = `Pollinate · try ${manifest.name}`;
  els.title.textContent = `Try ${manifest.name}`;
  els.name.textContent = manifest.name;
  els.version.textContent = `v${manifest.version}`;
  els.channel.textContent = manifest.channel ?? settings.channel;
  els.task.textContent = Array.isArray(manifest.labels) ? `classification (${manifest.labels.length} labels)` : 'regression';
  els.manifestLink.href = `/v1/models/${encodeURIComponent(manifest.name)}/versions/${manifest.version}/manifest`;
}

async function start() {
  if (!modelName) throw new Error('No model named in the address: open /try/NAME.');
  const manifest = await fetchManifest();
  page.manifest = manifest;
  renderModel(manifest);
  if (manifest.input?.preprocessing?.kind === 'image') {
    els.imageCard.hidden = false;
    const link = new URL('/web_client/', location.origin);
    link.searchParams.set('model', manifest.name);
    if (settings.channel !== 'stable') link.searchParams.set('channel', settings.channel);
    els.canvasLink.href = link.pathname + link.search;
    els.mode.textContent = 'on the drawing pad';
    setChip(`${manifest.name} v${manifest.version} · image model`, 'ready');
    return;
  }
  els.fields.replaceChildren(...(isTabular(manifest)
    ? formFields(manifest).map(f => (f.type === 'categorical' ? selectField(f) : numberField(f)))
    : [vectorField(manifest)]));
  els.formCard.hidden = false;
  const client = createClient({
    serverUrl: location.origin, model: manifest.name, channel: settings.channel, clientId: clientId(),
    mode: settings.mode, backends: settings.backends, maxModelBytes: settings.maxModelBytes,
    wasmPaths: new URL('../vendor/tfjs/', import.meta.url).href,
  });
  page.client = client;
  await client.load();
  page.manifest = client.manifest;
  renderModel(client.manifest);
  els.mode.textContent = client.mode === 'local'
    ? `in this browser (${client.backend})`
    : client.fallback ? `on the server (this browser cannot load it: ${client.fallback.message})` : 'on the server';
  els.mode.dataset.mode = client.mode;
  setChip(`${manifest.name} v${client.version} · ${client.mode === 'local' ? client.backend : 'server'}`, 'ready');
  els.predict.disabled = false;
}

els.form.addEventListener('submit', event => {
  event.preventDefault();
  predict().catch(() => {});
});

page.ready = start().catch(error => {
  setChip('Not available', 'error');
  showError(error.message);
  throw error;
});
page.ready.catch(() => {});
