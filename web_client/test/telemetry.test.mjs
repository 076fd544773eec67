// Field telemetry (docs/monitoring.md): the features and bins without a server, then a real
// `pollinate serve`: batches flushed every N predictions are merged into the version's
// window, a batch the server cannot take waits in the offline queue and goes later, feedback
// joins a prediction by its id, the shadow version runs beside the served one, and nothing
// is sent before the user opts in. Real @tensorflow/tfjs (cpu), a real store and server.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { after, before, describe, test } from 'node:test';

import { createClient, MemoryCache } from '../pollinate.js';
import { binIndex, featureValues, inputKind, newBatchId, newPredictionId, Telemetry, TelemetryQueue, VersionAggregate } from '../lib/telemetry.js';
import { pollinate, prepareStore, sampleDigits, startServer } from '../test-support/server.mjs';

const tfModule = await import('@tensorflow/tfjs');
const tf = tfModule.default?.loadLayersModel ? tfModule.default : tfModule;

const IMAGE_SPEC = { shape: [4, 4, 1], preprocessing: { kind: 'image' } };
const close = (a, b, tol = 1e-12) => Math.abs(a - b) <= tol;

describe('features and bins (no server)', () => {
  test('binning matches numpy clip(searchsorted(edges, v, "right") - 1, 0, K - 1)', () => {
    const edges = [0, 1, 2, 5];
    const cases = [[-3, 0], [0, 0], [0.5, 0], [1, 1], [1.999, 1], [2, 2], [4.9, 2], [5, 2], [99, 2], [NaN, -1], [Infinity, -1]];
    for (const [v, want] of cases) assert.equal(binIndex(v, edges), want, `v=${v}`);
    // repeated edges (a point mass): right-side search skips them all
    assert.equal(binIndex(1, [0, 1, 1, 2]), 2);
  });

  test('image features by hand: one ink pixel in the top-left corner', () => {
    const x = new Float32Array(16);
    x[0] = 1;
    const f = featureValues(x, IMAGE_SPEC);
    assert.equal(inputKind(IMAGE_SPEC), 'image');
    assert.ok(close(f.ink_mass, 1 / 16));
    assert.ok(close(f.coverage, 1 / 16));
    assert.equal(f.centroid_x, 0);
    assert.equal(f.centroid_y, 0);
    assert.equal(f.spread, 0);
    assert.deepEqual([f.rows_0, f.rows_1, f.rows_2, f.rows_3], [1, 0, 0, 0]);
    assert.deepEqual([f.cols_0, f.cols_1, f.cols_2, f.cols_3], [1, 0, 0, 0]);
  });

  test('image features by hand: two pixels, channels averaged and clipped', () => {
    // 2×2×2: pixel (0,0) channels (1, 1) → 1; pixel (1,1) channels (3, -1) → clip(1) = 1
    const spec = { shape: [2, 2, 2], preprocessing: { kind: 'image' } };
    const f = featureValues([1, 1, 0, 0, 0, 0, 3, -1], spec);
    assert.ok(close(f.ink_mass, 0.5));
    assert.ok(close(f.centroid_x, 0.5));
    assert.ok(close(f.centroid_y, 0.5));
    assert.ok(close(f.spread, Math.sqrt(0.5) / Math.sqrt(8)));
    assert.ok(close(f.rows_0 + f.rows_2, 1));
  });

  test('an empty image: shares are 0.5, mass and coverage 0', () => {
    const f = featureValues(new Float32Array(16), IMAGE_SPEC);
    assert.equal(f.ink_mass, 0);
    assert.equal(f.coverage, 0);
    for (const name of ['centroid_x', 'centroid_y', 'spread', 'rows_0', 'cols_3']) assert.equal(f[name], 0.5);
  });

  test('tabular: numeric columns by index, categorical as the argmax of its one-hot block, "(other)" when all 0', () => {
    const spec = {
      shape: [4],
      preprocessing: {
        kind: 'tabular',
        columns: [{ name: 'km', type: 'numeric' }, { name: 'city', type: 'categorical', vocabulary: ['a', 'b'] }, { name: 'load', type: 'numeric' }],
        features: ['km', 'load', 'city=a', 'city=b'],
      },
    };
    assert.deepEqual(featureValues([3.5, 7, 0, 1], spec), { km: 3.5, city: 1, load: 7 });
    assert.deepEqual(featureValues([3.5, 7, 0, 0], spec), { km: 3.5, city: 2, load: 7 });
  });

  test('vector: mean, population std, share of non-zero entries', () => {
    const f = featureValues([0, 2, 4, 0], { shape: [4] });
    assert.equal(inputKind({ shape: [4] }), 'vector');
    assert.equal(f.mean, 1.5);
    assert.ok(close(f.std, Math.sqrt((2.25 + 0.25 + 6.25 + 2.25) / 4)));
    assert.equal(f.nonzero, 0.5);
  });

  test('a version aggregate counts on its grid; non-finite outputs are errors; ids are random', () => {
    const grid = {
      features: [{ name: 'mean', edges: [0, 0.5, 1] }, { name: 'std', edges: [0, 1] }, { name: 'nonzero', edges: [0, 0.5, 1] }],
      prediction: { task: 'classification', labels: ['a', 'b', 'c'], confidence_edges: [0, 0.5, 1] },
      latency_ms_edges: [0, 1, 10],
    };
    const agg = new VersionAggregate(3, grid, { shape: [2] });
    agg.record({ input: [0, 1], output: [0.1, 0.7, 0.2], latencyMs: 0.3, id: 'x1' });
    agg.record({ input: [1, 1], output: [0.6, 0.3, 0.1], latencyMs: 4, id: 'x2' });
    agg.record({ input: [1, 1], output: [NaN, 0, 0], latencyMs: 4 });
    agg.record({ error: true });
    const body = agg.body('client-1');
    assert.equal(body.version, 3);
    assert.equal(body.client_id, 'client-1');
    assert.equal(body.predictions, 4);
    assert.equal(body.errors, 2);
    assert.deepEqual(body.latency_ms, [1, 2]);
    assert.deepEqual(body.features.mean, [0, 3]);  // 0.5 and 1 (twice) are in the last bin
    assert.deepEqual(body.prediction.classes, [1, 1, 0]);
    assert.deepEqual(body.prediction.confidence, [0, 2]);
    assert.deepEqual(body.recent.map(r => [r.id, r.prediction]), [['x1', 'b'], ['x2', 'a']]);
    assert.equal(JSON.stringify(body).includes('[0,1]'), false, 'no input in the batch');
    assert.match(newPredictionId(), /^[0-9a-f]{32}$/);
    assert.notEqual(newPredictionId(), newPredictionId());
  });

  test('a batch and a feedback carry a batch_id made once: a retry from the queue sends the same one', async () => {
    const grid = {
      features: [{ name: 'mean', edges: [0, 1] }], latency_ms_edges: [0, 1, 10],
      prediction: { task: 'classification', labels: ['a', 'b'], confidence_edges: [0, 0.5, 1] },
    };
    const manifest = { version: 1, monitoring: grid, input: { shape: [2] } };
    const sent = [];
    let down = true;
    const fakeFetch = async (url, init) => {
      sent.push(JSON.parse(init.body));
      if (down) throw new Error('offline');
      return new Response(JSON.stringify({ accepted: true, window: 'w' }), { status: 202 });
    };
    const t = new Telemetry({ serverUrl: 'http://127.0.0.1:9', model: 'm', cache: new MemoryCache(), fetch: fakeFetch });
    t.enable();
    t.record(manifest, { input: [0, 1], output: [0.2, 0.8], latencyMs: 1 });
    const queued = await t.flushVersion(1);
    assert.equal(queued.queued, true);
    const fed = await t.feedback({ version: 1, prediction: 'a', label: 'b' }, () => manifest);
    assert.equal(fed.queued, true);
    down = false;
    assert.equal(await t.retryQueued({ force: true }), 2);
    const ids = sent.map(b => b.batch_id);
    assert.equal(ids.length, 3, 'the batch (failed), then the batch and the feedback from the queue');
    assert.match(ids[0], /^[0-9a-f]{32}$/);
    assert.equal(ids[1], ids[0], 'the retried batch keeps its id');
    assert.match(ids[2], /^[0-9a-f]{32}$/);
    assert.notEqual(ids[2], ids[0]);
    assert.notEqual(newBatchId(), newBatchId());
    t.unlisten();
  });

  test('the device token goes with every post; a 401 asks for a new one once and retries with it', async () => {
    const seen = [];
    const fakeFetch = async (url, init) => {
      seen.push(init.headers.Authorization ?? null);
      const ok = init.headers.Authorization === 'Bearer fresh';
      return new Response(JSON.stringify(ok ? { accepted: true } : { detail: 'only enrolled devices' }), { status: ok ? 202 : 401 });
    };
    const renewed = [];
    const t = new Telemetry({
      serverUrl: 'http://127.0.0.1:9', model: 'm', cache: new MemoryCache(), fetch: fakeFetch,
      credentials: { token: async () => 'stale', renew: async refused => { renewed.push(refused); return 'fresh'; } },
    });
    const result = await t.post('http://127.0.0.1:9/v1/models/m/feedback', { version: 1, prediction: 'a', label: 'a' });
    assert.equal(result.ok, true);
    assert.deepEqual(seen, ['Bearer stale', 'Bearer fresh']);
    assert.deepEqual(renewed, ['stale']);
    // no token and no way to get one: one request, the 401 stands (not retried, not queued)
    const bare = new Telemetry({ serverUrl: 'http://127.0.0.1:9', model: 'm', cache: new MemoryCache(), fetch: fakeFetch });
    seen.length = 0;
    const refused = await bare.post('http://127.0.0.1:9/v1/models/m/feedback', {});
    assert.equal(refused.status, 401);
    assert.equal(refused.retry, false);
    assert.deepEqual(seen, [null]);
  });

  test('the offline queue keeps order in the cache adapter', async () => {
    const queue = new TelemetryQueue(new MemoryCache(), 'q/');
    await queue.push({ n: 1 });
    await queue.push({ n: 2 });
    const keys = await queue.keys();
    assert.deepEqual(await Promise.all(keys.map(async k => (await queue.get(k)).n)), [1, 2]);
    await queue.clear();
    assert.equal(await queue.size(), 0);
  });
});

// ---- against a real store and `pollinate serve` ------------------------------------------------

import { execFile, spawn } from 'node:child_process';
import net from 'node:net';
import readline from 'node:readline';
import { promisify } from 'node:util';

import { PYTHON, REPO } from '../test-support/server.mjs';

const runFile = promisify(execFile);
let home;
let server;
const samples = sampleDigits();
const open = [];

function client(options = {}, url = server.url) {
  const c = createClient({ serverUrl: url, model: 'digits', channel: 'stable', backends: ['cpu'], cache: new MemoryCache(), tf, ...options });
  open.push(c);
  return c;
}

async function monitor(url = server.url) {
  const response = await fetch(`${url}/v1/models/digits/monitor`);
  assert.equal(response.status, 200);
  return (await response.json()).report;
}

const telemetryPosts = c => c.telemetry.stats.batches;

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** `pollinate serve` on a given port (the offline test stops it and starts it again there). */
async function serveOn(port, extraEnv = {}) {
  const env = { ...process.env, TF_CPP_MIN_LOG_LEVEL: '3', ...extraEnv };
  for (const key of ['POLLINATE_HOME', 'POLLINATE_ADMIN_TOKEN', 'POLLINATE_SERVER', 'POLLINATE_WEB_CLIENT', 'POLLINATE_CORS_ORIGINS']) delete env[key];
  const child = spawn(PYTHON, ['-m', 'pollinate', 'serve', '--home', home, '--port', String(port), '--json'],
    { cwd: REPO, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let stderr = '';
  child.stderr.on('data', chunk => { stderr = (stderr + chunk).slice(-10_000); });
  const exited = new Promise(resolve => child.once('exit', resolve));
  await Promise.race([
    new Promise(resolve => readline.createInterface({ input: child.stdout }).once('line', resolve)),
    exited.then(code => { throw new Error(`serve exited (${code}): ${stderr}`); }),
  ]);
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 600; i++) {
    try {
      if ((await fetch(`${url}/healthz`)).ok) break;
    } catch { /* not yet */ }
    await new Promise(r => setTimeout(r, 50));
  }
  return {
    url,
    stop: async () => {
      try { process.kill(-child.pid, 'SIGTERM'); } catch { /* gone */ }
      await exited;
    },
  };
}

describe('telemetry against a real server', { timeout: 600_000 }, () => {
  before(async () => {
    await tf.setBackend('cpu');
    home = await prepareStore();
    server = await startServer(home);
  });

  after(async () => {
    for (const c of open) await c.close().catch(() => {});
    await server?.stop();
    if (home) fs.rmSync(home, { recursive: true, force: true });
  });

  test('the manifest carries the grid; nothing is counted or sent before the user opts in', async () => {
    const c = client();
    await c.load();
    assert.ok(c.manifest.monitoring, 'the served version has a monitoring grid');
    assert.equal(c.manifest.monitoring.kind, 'image');
    const before = (await monitor()).versions['1']?.predictions ?? 0;
    for (const s of samples.slice(0, 5)) {
      const r = await c.predict(s.pixels);
      assert.match(r.id, /^[0-9a-f]{32}$/);
    }
    await c.flushTelemetry();
    assert.equal(c.telemetryOptedIn(), false);
    assert.equal(c.telemetry.stats.batches, 0);
    assert.equal(c.telemetry.stats.bytesSent, 0);
    await assert.rejects(c.feedback({ predictionId: 'a'.repeat(32), label: '1' }), e => e.code === 'not-opted-in');
    assert.equal((await monitor()).versions['1']?.predictions ?? 0, before);
  });

  test('opted in: a batch every flushEvery predictions, the rest on flush; the server\'s report adds them up', async () => {
    const before = (await monitor()).versions['1']?.predictions ?? 0;
    const c = client({ telemetry: { flushEvery: 4 } });
    await c.load();
    await c.optInTelemetry();
    const results = [];
    for (const s of samples.slice(0, 10)) results.push(await c.predict(s.pixels));
    await Promise.allSettled([...c.telemetry.pending]);
    assert.equal(telemetryPosts(c), 2, 'two full batches of 4 went on their own');
    await c.flushTelemetry();
    assert.equal(telemetryPosts(c), 3);
    assert.equal(c.telemetry.stats.dropped, 0, c.telemetry.stats.lastError);
    const report = await monitor();
    const v1 = report.versions['1'];
    assert.equal(v1.predictions, before + 10);
    // the browser's own counts: what it sent is what the server holds for this version's window
    assert.ok(v1.latency_ms && Number.isFinite(v1.latency_ms.p50));
    assert.ok(Object.keys(v1.drift).includes('ink_mass'));

    // the consent is remembered: a new client on the same storage counts without asking again
    const again = client({ cache: c.cache });
    await again.load();
    assert.equal(again.telemetryOptedIn(), true);

    // "it was a 7": feedback naming a prediction's id joins it on the server
    const wrong = results.find(r => r.label !== '7') ?? results[0];
    const answer = await c.feedback({ predictionId: results[9].id, label: results[9].label });
    assert.equal(answer.sent, true, JSON.stringify(answer));
    const other = await c.feedback({ version: 1, prediction: wrong.label, label: '7' });
    assert.equal(other.sent, true, JSON.stringify(other));
    const fed = (await monitor()).versions['1'];
    assert.ok(fed.feedback >= 2);
    assert.ok(fed.field_accuracy.n >= 2);
    await assert.rejects(c.feedback({ predictionId: results[0].id, label: 'seven' }), e => e.code === 'label');
  });

  test('a batch lists only the prediction ids feedback names (or every id with recentIds: all)', async () => {
    const bodies = [];
    const observed = async (url, init) => {
      if (String(url).endsWith('/telemetry')) bodies.push(JSON.parse(init.body));
      return fetch(url, init);
    };
    const c = client({ fetch: observed, telemetry: { enabled: true, flushEvery: 100 } });
    await c.load();
    const [a, b] = [await c.predict(samples[0].pixels), await c.predict(samples[1].pixels)];
    const answer = await c.feedback({ predictionId: b.id, label: samples[1].label });
    assert.equal(answer.sent, true, JSON.stringify(answer));
    assert.equal(bodies.length, 1);
    assert.deepEqual(bodies[0].recent.map(r => r.id), [b.id], 'only the id the feedback names');
    assert.equal(bodies[0].predictions, 2);
    // a's batch went without its id: its feedback carries the prediction as this client remembers it
    assert.equal((await c.feedback({ predictionId: a.id, label: samples[0].label })).sent, true);

    const all = client({ fetch: observed, telemetry: { enabled: true, flushEvery: 100, recentIds: 'all' } });
    await all.load();
    const r = [await all.predict(samples[2].pixels), await all.predict(samples[3].pixels)];
    await all.flushTelemetry();
    assert.deepEqual(bodies.at(-1).recent.map(x => x.id), r.map(x => x.id));
    // the server knows both ids now: a late label joins by id alone
    assert.equal((await all.feedback({ predictionId: r[0].id, label: samples[2].label })).sent, true);
  });

  test('opting out forgets what was not sent and stops counting', async () => {
    const c = client({ telemetry: { flushEvery: 100 } });
    await c.load();
    await c.optInTelemetry();
    await c.predict(samples[0].pixels);
    await c.optOutTelemetry();
    await c.predict(samples[1].pixels);
    await c.flushTelemetry();
    assert.equal(c.telemetry.stats.batches, 0);
    assert.equal(c.telemetry.aggregates.size, 0);
  });

  test('offline: a batch the server cannot take waits in the queue and goes when it is back', async () => {
    const port = await freePort();
    let own = await serveOn(port);
    const cache = new MemoryCache();
    const c = client({ cache, telemetry: { enabled: true, flushEvery: 100 } }, own.url);
    await c.load();
    const before = (await monitor(own.url)).versions['1']?.predictions ?? 0;
    for (const s of samples.slice(0, 6)) await c.predict(s.pixels);
    await own.stop();
    const [first] = await c.flushTelemetry();
    assert.equal(first.queued, true, JSON.stringify(first));
    assert.equal(await c.telemetry.queue.size(), 1);
    for (const s of samples.slice(0, 3)) await c.predict(s.pixels);
    own = await serveOn(port);
    try {
      await c.flushTelemetry();
      assert.equal(await c.telemetry.queue.size(), 0);
      assert.equal((await monitor(own.url)).versions['1'].predictions, before + 9, 'the queued batch and the new one, each once');
    } finally {
      await c.close();
      await own.stop();
    }
  });

  test('a batch whose answer was lost is sent again from the queue and counted once (its batch_id)', async () => {
    let lose = 1;
    const losing = async (url, init) => {
      const response = await fetch(url, init);
      if (String(url).endsWith('/telemetry') && lose > 0) {
        lose -= 1;
        throw new Error('the connection dropped before the answer');  // the server did count it
      }
      return response;
    };
    const c = client({ fetch: losing, telemetry: { enabled: true, flushEvery: 100 } });
    await c.load();
    const before = (await monitor()).versions['1']?.predictions ?? 0;
    for (const s of samples.slice(0, 4)) await c.predict(s.pixels);
    const [first] = await c.flushTelemetry();
    assert.equal(first.queued, true, JSON.stringify(first));
    await c.flushTelemetry();  // the queue goes again: the same batch, the same id
    assert.equal(await c.telemetry.queue.size(), 0);
    assert.equal((await monitor()).versions['1'].predictions, before + 4, 'counted once');
  });

  test('a server that takes enrolled devices only: the client enrols once and its batches and feedback count', async () => {
    const port = await freePort();
    const own = await serveOn(port, { POLLINATE_MONITOR_AUTH: 'device' });
    const c = client({ telemetry: { enabled: true, flushEvery: 100 } }, own.url);
    try {
      await c.load();
      const before = (await monitor(own.url)).versions['1'] ?? { predictions: 0, feedback: 0 };
      const anonymous = await fetch(`${own.url}/v1/models/digits/feedback`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ version: 1, prediction: '1', label: '1' }),
      });
      assert.equal(anonymous.status, 401);
      const results = [];
      for (const s of samples.slice(0, 3)) results.push(await c.predict(s.pixels));
      const [sent] = await c.flushTelemetry();
      assert.equal(sent.sent, true, JSON.stringify(sent));
      const identity = await c.deviceIdentity();
      assert.match(identity.token, /\S{20,}/, 'enrolled on the 401');
      const fed = await c.feedback({ predictionId: results[2].id, label: results[2].label });
      assert.equal(fed.sent, true, JSON.stringify(fed));
      const v1 = (await monitor(own.url)).versions['1'];
      assert.equal(v1.predictions, before.predictions + 3);
      assert.equal(v1.feedback, before.feedback + 1);
    } finally {
      await c.close();
      await own.stop();
    }
  });

  test('a shadow version runs beside the served one: agreement and latency arrive, its answers are never returned', async () => {
    await runFile(PYTHON, ['-c', 'import sys; from registry import Store; from registry.monitoring import Monitor; '
      + 'Monitor(Store(sys.argv[1])).set_shadow("digits", "stable", 2)', home], { cwd: REPO });
    const c = client({ telemetry: { enabled: true, flushEvery: 1000 } });
    await c.load();
    assert.equal(c.manifest.shadow?.version, 2);
    const shadow = await c.shadowReady();
    assert.equal(shadow?.version, 2, c.shadowError);
    assert.equal(c.version, 1);
    for (const s of samples) {
      const r = await c.predict(s.pixels);
      assert.equal(r.version, 1);
    }
    await c.flushTelemetry();
    assert.equal(c.telemetry.stats.dropped, 0, c.telemetry.stats.lastError);
    const v1 = (await monitor()).versions['1'];
    assert.ok(v1.shadow, JSON.stringify(v1));
    assert.equal(v1.shadow.version, 2);
    assert.equal(v1.shadow.compared, samples.length);
    assert.ok(v1.shadow.agreed >= samples.length / 2 && v1.shadow.agreed <= samples.length, JSON.stringify(v1.shadow));
    assert.ok(Number.isFinite(v1.shadow.latency_ms.p50));
    await runFile(PYTHON, ['-c', 'import sys; from registry import Store; from registry.monitoring import Monitor; '
      + 'Monitor(Store(sys.argv[1])).set_shadow("digits", "stable", None)', home], { cwd: REPO });
  });
});
