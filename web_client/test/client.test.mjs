// The library against a real `pollinate serve` on 127.0.0.1 and real exported models:
// load + predict, sha256 refusal, cache + 304 revalidation, updates, offline, input checks,
// and contributing to a federated round (tasks opened in the real store, as a gateway does).

import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';

import { createClient, InputError, IntegrityError, MemoryCache, PollinateError } from '../pollinate.js';
import { pollinate, prepareStore, PYTHON, REPO, sampleDigits, startServer } from '../test-support/server.mjs';

const tfModule = await import('@tensorflow/tfjs');
const tf = tfModule.default?.loadLayersModel ? tfModule.default : tfModule;

let home;
let server;
const samples = sampleDigits();
const open = [];

function client(options = {}) {
  const c = createClient({ serverUrl: server.url, model: 'digits', channel: 'stable', backends: ['cpu'], cache: new MemoryCache(), ...options });
  open.push(c);
  return c;
}

const files = log => log.filter(e => e.kind === 'file');
const manifests = log => log.filter(e => e.kind === 'manifest');

/** fetch that changes one byte of every response whose URL contains `part`. */
function flippingFetch(part) {
  return async (url, init) => {
    const response = await fetch(url, init);
    if (!String(url).includes(part) || response.status !== 200) return response;
    const bytes = new Uint8Array(await response.arrayBuffer());
    bytes[bytes.length >> 1] ^= 0x01;
    return new Response(bytes, { status: 200, headers: { etag: response.headers.get('etag') ?? '' } });
  };
}

/** fetch that rewrites the manifest's sha256 of one file (the bytes stay real). */
function lyingManifestFetch(fileName) {
  return async (url, init) => {
    const response = await fetch(url, init);
    if (!String(url).includes('/manifest') || response.status !== 200) return response;
    const manifest = await response.json();
    for (const file of manifest.artifacts['tfjs-layers'].files) {
      if (file.name === fileName) file.sha256 = '0'.repeat(64);
    }
    return new Response(JSON.stringify(manifest), { status: 200, headers: { etag: '"lied"' } });
  };
}

function waitFor(register, timeoutMs, what) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
    register(value => {
      clearTimeout(timer);
      resolve(value);
    });
  });
}

before(async () => {
  home = await prepareStore();
  server = await startServer(home);
});

after(async () => {
  for (const c of open) await c.close().catch(() => {});
  await server?.stop();
  if (home) fs.rmSync(home, { recursive: true, force: true });
});

describe('load and predict', () => {
  test('load fetches the manifest and the TF.js files once, verified, and predicts the test digits', async () => {
    const c = client();
    const load = await c.load();
    assert.equal(load.version, 1);
    assert.equal(load.manifestStatus, 200);
    assert.equal(load.source, 'network');
    assert.equal(c.backend, 'cpu');
    assert.deepEqual(c.fetchLog.map(e => [e.kind, e.status]).sort(), [['file', 200], ['file', 200], ['manifest', 200]]);
    assert.deepEqual(load.downloads.map(d => d.name).sort(), ['group1-shard1of1.bin', 'model.json']);
    assert.equal(c.info.lineage.source, 'central');
    assert.deepEqual(c.labels, ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']);

    let correct = 0;
    for (const sample of samples) {
      const result = await c.predict(sample.pixels);
      assert.equal(result.version, 1);
      assert.equal(result.backend, 'cpu');
      assert.equal(result.labels.length, 10);
      assert.equal(result.label, result.labels[0].label);
      assert.equal(result.top, result.labels[0].probability);
      assert.equal(result.confident, result.top >= 0.5);
      for (let i = 1; i < 10; i++) assert.ok(result.labels[i - 1].probability >= result.labels[i].probability);
      assert.ok(Math.abs(result.probabilities.reduce((a, b) => a + b, 0) - 1) < 1e-4);
      assert.ok(result.inferenceMs > 0 && result.inferenceMs < 1000);
      if (result.label === sample.label) correct += 1;
    }
    assert.ok(correct >= 8, `only ${correct}/10 test digits right`);
  });

  test('backends: webgl is skipped in Node, wasm is next and agrees with cpu', async () => {
    const cpu = client();
    await cpu.load();
    const expected = await Promise.all(samples.map(s => cpu.predict(s.pixels)));
    await cpu.close();
    const wasm = client({ backends: ['webgl', 'wasm', 'cpu'] });
    await wasm.load();
    try {
      assert.equal(wasm.backend, 'wasm');
      assert.deepEqual(wasm.skippedBackends.map(s => s.name), ['webgl']);
      for (const [i, sample] of samples.entries()) {
        const got = await wasm.predict(sample.pixels);
        assert.equal(got.label, expected[i].label);
        assert.equal(got.backend, 'wasm');
        got.probabilities.forEach((p, k) => assert.ok(Math.abs(p - expected[i].probabilities[k]) < 1e-4));
      }
    } finally {
      await wasm.close();
      await tf.setBackend('cpu');
    }
  });

  test('a missing model is a clear HTTP error', async () => {
    const c = client({ model: 'nope' });
    await assert.rejects(c.load(), e => e instanceof PollinateError && e.code === 'http' && e.status === 404);
    await assert.rejects(c.predict(samples[0].pixels), e => e.code === 'not-loaded');
  });
});

describe('integrity', () => {
  test('a tampered weight file is refused and nothing is cached', async () => {
    const cache = new MemoryCache();
    const c = client({ cache, fetch: flippingFetch('group1-shard1of1.bin') });
    await assert.rejects(c.load(), e => e instanceof IntegrityError && e.code === 'integrity' && e.file === 'group1-shard1of1.bin'
      && /sha256/.test(e.message));
    assert.equal(c.model, null);
    assert.deepEqual(await cache.keys(''), []);
  });

  test('a tampered model.json is refused', async () => {
    const cache = new MemoryCache();
    const c = client({ cache, fetch: flippingFetch('model.json') });
    await assert.rejects(c.load(), e => e.code === 'integrity' && e.file === 'model.json');
    assert.deepEqual(await cache.keys(''), []);
  });

  test('real bytes against a manifest that names another sha256 are refused', async () => {
    const cache = new MemoryCache();
    const c = client({ cache, fetch: lyingManifestFetch('group1-shard1of1.bin') });
    await assert.rejects(c.load(), e => e.code === 'integrity' && e.expected === '0'.repeat(64));
    assert.deepEqual(await cache.keys(''), []);
  });

  test('a corrupted cache entry is detected and downloaded again', async () => {
    const cache = new MemoryCache();
    await client({ cache }).load();
    const [key] = await cache.keys('model/');
    const stored = cache.entries.get(key);
    new Uint8Array(stored.files[0].data)[10] ^= 0xff;
    const c = client({ cache });
    const load = await c.load();
    assert.equal(load.manifestStatus, 304);
    assert.equal(load.source, 'network');
    assert.equal(files(c.fetchLog).length, 2);
    const again = await client({ cache }).load();
    assert.equal(again.source, 'cache');
  });
});

describe('cache', () => {
  test('a second load revalidates the manifest (304) and downloads no file', async () => {
    const cache = new MemoryCache();
    const first = client({ cache });
    await first.load();
    const before = await first.predict(samples[3].pixels);
    await first.close();

    const second = client({ cache });  // a new page load: same cache, new client
    const load = await second.load();
    assert.equal(load.manifestStatus, 304);
    assert.equal(load.source, 'cache');
    assert.deepEqual(load.downloads, []);
    assert.equal(load.bytesDownloaded, 0);
    assert.deepEqual(second.fetchLog.map(e => [e.kind, e.status]), [['manifest', 304]]);
    const after = await second.predict(samples[3].pixels);
    assert.deepEqual(after.probabilities, before.probabilities);
  });

  test('with the server stopped, a cached model still loads and predicts', async () => {
    const own = await startServer(home);
    const cache = new MemoryCache();
    const online = createClient({ serverUrl: own.url, model: 'digits', backends: ['cpu'], cache });
    open.push(online);
    await online.load();
    const expected = await online.predict(samples[0].pixels);
    await own.stop();

    const offline = createClient({ serverUrl: own.url, model: 'digits', backends: ['cpu'], cache });
    open.push(offline);
    const load = await offline.load();
    assert.equal(load.manifestStatus, 'offline');
    assert.equal(load.source, 'cache');
    assert.equal(offline.offline, true);
    assert.equal(manifests(offline.fetchLog)[0].status, 'failed');
    assert.deepEqual((await offline.predict(samples[0].pixels)).probabilities, expected.probabilities);

    // and with nothing cached, being offline is an error that says so
    const empty = createClient({ serverUrl: own.url, model: 'digits', backends: ['cpu'], cache: new MemoryCache() });
    open.push(empty);
    await assert.rejects(empty.load(), e => e.code === 'network' && /cannot reach/.test(e.message));
  });
});

describe('updates', () => {
  test('checkForUpdate switches to a newly published version and frees the old model', async () => {
    await pollinate(home, 'models', 'promote', 'digits', '1', '--channel', 'stable');
    const cache = new MemoryCache();
    const c = client({ cache });
    await c.load();
    assert.equal(c.version, 1);
    const v1 = await c.predict(samples[9].pixels);
    const tensorsWithOneModel = tf.memory().numTensors;
    const oldModel = c.model;

    assert.deepEqual(await c.checkForUpdate(), { updated: false, status: 304, from: 1, to: 1 });

    await pollinate(home, 'models', 'promote', 'digits', '2', '--channel', 'stable');
    const events = [];
    c.on('available', e => events.push(['available', e.from, e.to]));
    c.on('updated', e => events.push(['updated', e.from, e.to]));
    assert.deepEqual(await c.checkForUpdate(), { updated: true, status: 200, from: 1, to: 2 });
    assert.deepEqual(events, [['available', 1, 2], ['updated', 1, 2]]);
    assert.equal(c.version, 2);
    assert.notEqual(c.model, oldModel);
    assert.equal(c.lastDispose.version, 1);
    assert.ok(c.lastDispose.numDisposedVariables > 0);
    assert.equal(tf.memory().numTensors, tensorsWithOneModel, 'the old model\'s tensors were not freed');
    assert.deepEqual(c.lastLoad.downloads.map(d => d.name).sort(), ['group1-shard1of1.bin', 'model.json']);

    const v2 = await c.predict(samples[9].pixels);
    assert.equal(v2.version, 2);
    assert.notDeepEqual(v2.probabilities, v1.probabilities, 'v2 has other weights than v1');

    // both versions are cached now: a new page on v2 downloads nothing
    const next = client({ cache });
    const load = await next.load();
    assert.equal(load.version, 2);
    assert.equal(load.source, 'cache');
  });

  test('onUpdate polls, calls back on a new version, and stops when switched off', async () => {
    await pollinate(home, 'models', 'promote', 'digits', '2', '--channel', 'stable');
    const c = client();
    await c.load();
    assert.equal(c.version, 2);
    let off;
    const update = waitFor(resolve => { off = c.onUpdate(resolve, { intervalMs: 100 }); }, 30_000, 'the update callback');
    assert.equal(c.poller.running, true);
    await pollinate(home, 'models', 'promote', 'digits', '1', '--channel', 'stable');  // a rollback is an update too
    const event = await update;
    assert.equal(event.from, 2);
    assert.equal(event.to, 1);
    assert.equal(event.manifest.version, 1);
    assert.equal(c.version, 1);
    assert.ok(manifests(c.fetchLog).some(e => e.status === 304), 'polls before the change revalidated with 304');
    off();
    assert.equal(c.poller.running, false);
    const polls = manifests(c.fetchLog).length;
    await new Promise(r => setTimeout(r, 400));
    assert.equal(manifests(c.fetchLog).length, polls, 'no polling after off()');
  });

  test('polling backs off exponentially while the server is unreachable', async () => {
    const own = await startServer(home);
    const c = createClient({ serverUrl: own.url, model: 'digits', backends: ['cpu'], cache: new MemoryCache() });
    open.push(c);
    await c.load();
    await own.stop();
    const delays = [];
    const done = waitFor(resolve => c.on('error', e => {
      assert.equal(e.code, 'network');
      delays.push(e.nextDelayMs);
      if (delays.length === 5) resolve();
    }), 20_000, 'five failed polls');
    c.startPolling({ intervalMs: 20, maxIntervalMs: 200, jitter: 0 });
    await done;
    c.stopPolling();
    assert.deepEqual(delays, [40, 80, 160, 200, 200]);
    assert.equal(c.offline, true);
    assert.equal(c.version, 1, 'the loaded model stays in use');
    assert.equal((await c.predict(samples[1].pixels)).version, 1);
  });
});

describe('input checks', () => {
  let c;
  before(async () => {
    c = client();
    await c.load();
  });

  test('the same digit in every accepted form gives the same answer', async () => {
    const flat = samples[2].pixels;
    const rows = Array.from({ length: 8 }, (_, r) => flat.slice(r * 8, r * 8 + 8));
    const forms = [flat, Float32Array.from(flat), rows, rows.map(row => row.map(v => [v])), [rows.map(row => row.map(v => [v]))]];
    const results = await Promise.all(forms.map(f => c.predict(f)));
    for (const r of results) assert.deepEqual(r.probabilities, results[0].probabilities);
    // preprocessing is the manifest's: x = pixel * 1/16
    assert.deepEqual(Array.from(results[0].modelInput), flat.map(v => v / 16));
  });

  const bad = {
    'too few values': [new Array(63).fill(0), 'input-shape', /shape \[8,8,1\].*got shape \[63\]/],
    'wrong shape': [Array.from({ length: 8 }, () => new Array(7).fill(0)), 'input-shape', /got shape \[8,7\]/],
    'a batch of two': [[new Array(64).fill(0), new Array(64).fill(0)], 'input-shape', /got shape \[2,64\]/],
    ragged: [[new Array(8).fill(0), new Array(7).fill(0)], 'input-shape', /ragged/],
    NaN: [Object.assign(new Array(64).fill(0), { 5: NaN }), 'input-nonfinite', /input\[0, 5, 0\] is NaN/],
    Infinity: [Object.assign(new Array(64).fill(0), { 63: Infinity }), 'input-nonfinite', /input\[7, 7, 0\] is Infinity/],
    'a string': [Object.assign(new Array(64).fill(0), { 1: '3' }), 'input-type', /not a number/],
    null: [null, 'input-type', /array or typed array/],
    'above the range': [Object.assign(new Array(64).fill(0), { 9: 17 }), 'input-range', /= 17 is outside the model's source range \[0, 16\]/],
    'below the range': [Object.assign(new Array(64).fill(0), { 0: -1 }), 'input-range', /outside/],
  };
  for (const [name, [input, code, message]] of Object.entries(bad)) {
    test(`refuses ${name} before the model sees it`, async () => {
      await assert.rejects(c.predict(input), e => e instanceof InputError && e.code === code && message.test(e.message));
    });
  }

  test('refuses a tf.Tensor (inputs are checked as plain numbers)', async () => {
    const t = tf.zeros([8, 8, 1]);
    await assert.rejects(c.predict(t), e => e.code === 'input-type' && /not a tf.Tensor/.test(e.message));
    t.dispose();
  });

  test('checkRange: false lets out-of-range values through (they are still finite)', async () => {
    const result = await c.predict(new Array(64).fill(20), { checkRange: false });
    assert.equal(result.labels.length, 10);
  });
});

// ---- contributing to a federated round ------------------------------------------------------
//
// The gateway's side, played in Python on the same store: `open` a task for round R whose base
// is v1's Keras weights (names and order from model.get_weights()), or another task's base;
// `updates` reads back what the server recorded.
const EDGE = `
import json, sys, time
import numpy as np
from registry import Store
from registry.edge import EdgeStore, weights_spec
op, home, *args = sys.argv[1:]
edge = EdgeStore(Store(home))
if op == "open":
    rnd, source = int(args[0]), args[1]
    if source == "keras":
        import shutil, tempfile
        from pathlib import Path
        import keras
        folder = Path(tempfile.mkdtemp())
        shutil.copy(Store(home).artifact_path("digits", 1, "keras", "model.keras"), folder / "model.keras")
        model = keras.saving.load_model(folder / "model.keras")
        arrays = model.get_weights()
        spec = weights_spec(arrays, [v.path for v in model.weights])
        base = np.concatenate([a.ravel() for a in arrays])
    else:
        spec, base = edge.get_task(source).weights, edge.base_weights(source)
    task = edge.open_task("digits", federation="node-test", round=rnd, gateway="gw", base_version=1,
        config={"epochs": 1, "batch_size": 8, "learning_rate": 0.001}, weights=spec, base=base,
        deadline=time.time() + 600, min_updates=1, norm_bound=float(np.linalg.norm(base)))
    print(json.dumps({"task_id": task.task_id, "size": task.size}))
elif op == "updates":
    print(json.dumps([{"device_id": u.device_id, "examples": u.examples, "size": int(u.delta.size),
        "finite": bool(np.isfinite(u.delta).all()), "norm": float(np.linalg.norm(u.delta.astype(np.float64)))}
        for u in edge.updates(args[0])]))
`;
const edgeEnv = () => ({ ...process.env, TF_CPP_MIN_LOG_LEVEL: '3', PYTHONPATH: REPO });
const edge = async (...args) => JSON.parse((await promisify(execFile)(PYTHON, ['-c', EDGE, ...args], { cwd: REPO, env: edgeEnv() })).stdout);
const edgeSync = (...args) => JSON.parse(execFileSync(PYTHON, ['-c', EDGE, ...args], { cwd: REPO, env: edgeEnv() }).toString());

describe('contribute to a federated round', () => {
  let first;
  const cache = new MemoryCache();
  const device = (options = {}) => client({ backends: ['wasm', 'cpu'], cache, ...options });

  before(async () => {
    first = await edge('open', home, '1', 'keras');
  });

  test('corrections train on cpu (wasm cannot), local − base is accepted once, inference stays on wasm', async () => {
    const c = device();
    await c.load();
    assert.equal(c.backend, 'wasm');
    for (const sample of samples.slice(0, 4)) {
      const result = await c.predict(sample.pixels);
      await c.addExample(result.modelInput, sample.label);
    }
    assert.equal(await c.examples.count(), 4);
    await assert.rejects(c.contribute(), e => e.code === 'not-opted-in');
    await c.optIn();
    const phases = [];
    const outcome = await c.contribute({ onProgress: p => phases.push(p.phase) });
    assert.equal(outcome.status, 'accepted', JSON.stringify(outcome));
    assert.equal(outcome.taskId, first.task_id);
    assert.equal(outcome.round, 1);
    assert.equal(outcome.accepted, 1);
    assert.equal(outcome.examples, 4);
    assert.equal(outcome.backend, 'cpu');
    assert.equal(outcome.inferenceBackend, 'wasm');
    assert.match(outcome.backendReason, /Conv2DBackpropFilter/);
    assert.equal(outcome.bytesUp, first.size * 4);
    assert.ok(outcome.lossAfter < outcome.lossBefore, `${outcome.lossBefore} → ${outcome.lossAfter}`);
    assert.ok(Math.abs(outcome.serverNorm - outcome.norm) < 1e-6 * Math.max(1, outcome.norm), 'the server read the bytes the client sent');
    assert.deepEqual([...new Set(phases)], ['enrol', 'task', 'download', 'train', 'upload', 'done']);
    assert.equal(c.tf.getBackend(), 'wasm', 'back on the inference backend');
    assert.equal((await c.predict(samples[0].pixels)).backend, 'wasm');

    const [update] = await edge('updates', home, first.task_id);
    assert.equal(update.examples, 4);
    assert.equal(update.size, first.size);
    assert.ok(update.finite && update.norm > 0);
    const status = await c.federationStatus();
    assert.equal(status.round, 1);
    assert.equal(status.accepted, 1);
    // the device enrolled once; its update is in, so the round has nothing more for it
    assert.equal((await c.contribute()).status, 'no-task');
    assert.equal(c.fetchLog.filter(e => e.kind === 'enrol').length, 1);
    assert.equal(c.fetchLog.filter(e => e.kind === 'update').length, 1);
  });

  test('a token the server does not know (401) enrols again, once, and the update goes in', async () => {
    const round = await edge('open', home, '2', first.task_id);
    const c = device();
    await c.load();
    const kept = await cache.get(c.preferenceKey('device'));
    await cache.set(c.preferenceKey('device'), { ...kept, token: 'not-a-token-the-server-issued' });
    const outcome = await c.contribute();
    assert.equal(outcome.status, 'accepted');
    assert.equal(outcome.taskId, round.task_id);
    assert.notEqual(outcome.deviceId, kept.device_id, 'a new enrolment');
    assert.deepEqual(c.fetchLog.filter(e => ['task', 'enrol'].includes(e.kind)).map(e => [e.kind, e.status]),
      [['task', 401], ['enrol', 201], ['task', 200]]);
  });

  test('a round that closes while the device trains (409 stale) → the current task, trained again', async () => {
    const stale = await edge('open', home, '3', first.task_id);
    let current = null;
    const c = device();
    await c.load();
    const outcome = await c.contribute({
      onProgress: p => {
        // the gateway moves on to round 4 while this device trains round 3
        if (p.phase === 'train' && p.round === 3 && !current) current = edgeSync('open', home, '4', first.task_id);
      },
    });
    assert.equal(outcome.status, 'accepted', JSON.stringify(outcome));
    assert.equal(outcome.round, 4);
    assert.equal(outcome.taskId, current.task_id);
    assert.deepEqual(c.fetchLog.filter(e => e.kind === 'update').map(e => e.status), [409, 202]);
    assert.deepEqual(await edge('updates', home, stale.task_id), [], 'nothing counted for the closed round');
  });

  test('two tabs of one browser race for one round: one update is accepted, the other is a duplicate', async () => {
    const round = await edge('open', home, '5', first.task_id);
    const [a, b] = [device(), device()];
    await Promise.all([a.load(), b.load()]);
    const outcomes = await Promise.all([a.contribute(), b.contribute()]);
    assert.deepEqual(outcomes.map(o => o.status).sort(), ['accepted', 'duplicate'], JSON.stringify(outcomes));
    assert.match(outcomes.find(o => o.status === 'duplicate').detail, /already/);
    assert.equal((await edge('updates', home, round.task_id)).length, 1);
  });

  test('cancelled while training: nothing is sent, the backend is restored', async () => {
    const round = await edge('open', home, '6', first.task_id);
    const c = device();
    await c.load();
    const controller = new AbortController();
    await assert.rejects(
      c.contribute({ signal: controller.signal, onProgress: p => { if (p.phase === 'train') controller.abort(new Error('user switched it off')); } }),
      e => e.code === 'aborted' && /user switched it off/.test(e.message),
    );
    assert.equal(c.tf.getBackend(), 'wasm');
    assert.equal(c.fetchLog.filter(e => e.kind === 'update').length, 0);
    assert.deepEqual(await edge('updates', home, round.task_id), []);
    // and the round is still there for the next try
    assert.equal((await c.contribute()).status, 'accepted');
  });
});
