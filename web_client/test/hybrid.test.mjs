// Tabular rows and hybrid serving (lib/tabular.js, lib/hybrid.js): rows encoded by the
// input spec exactly as registry/inputs.py encodes them (checked against the Python code
// itself), clear refusals naming the row and column; then a real `pollinate serve` with
// delivery-eta and digits: mode 'server' equals the local model, and mode 'auto' answers from
// the server's predict when the model cannot load here (no backend, too large, a tampered
// file, a format TF.js is not given), with the same version. Real @tensorflow/tfjs (cpu).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { createClient, encodeRow, encodeRows, formFields, InputError, MemoryCache, tabularSpec } from '../pollinate.js';
import { nest } from '../lib/hybrid.js';
import { pollinate, PYTHON, REPO, sampleDigits, startServer } from '../test-support/server.mjs';

const tfModule = await import('@tensorflow/tfjs');
const tf = tfModule.default?.loadLayersModel ? tfModule.default : tfModule;

const SPEC = {
  shape: [8],
  dtype: 'float32',
  preprocessing: {
    kind: 'tabular',
    columns: [
      { name: 'distance_km', type: 'numeric' },
      { name: 'hour', type: 'numeric' },
      { name: 'city', type: 'categorical', vocabulary: ['amsterdam', 'berlin', 'london'], encoding: 'one-hot' },
      { name: 'weekday', type: 'numeric' },
      { name: 'size', type: 'categorical', vocabulary: ['1', '2'], encoding: 'one-hot' },
    ],
    // the features' order is the spec's, not the columns'
    features: ['distance_km', 'hour', 'weekday', 'city=amsterdam', 'city=berlin', 'city=london', 'size=1', 'size=2'],
    normalization: 'in-model',
    unknown_category: 'all-zero one-hot block',
  },
};
const ROW = { distance_km: 2.5, hour: 19, city: 'berlin', weekday: 4, size: '2' };

/** registry.inputs.encode_rows on the same rows and spec, in Python. */
function pythonEncode(rows, spec) {
  const script = 'import json, sys\nfrom registry.inputs import encode_rows\nd = json.load(sys.stdin)\n'
    + 'print(json.dumps(encode_rows(d["rows"], d["spec"]).tolist()))';
  return JSON.parse(execFileSync(PYTHON, ['-c', script], { cwd: REPO, input: JSON.stringify({ rows, spec }), stdio: ['pipe', 'pipe', 'pipe'] }).toString());
}

describe('tabular rows (no server)', () => {
  const spec = tabularSpec(SPEC);

  test('numbers at their features, one-hot over the vocabulary, the spec\'s order', () => {
    assert.deepEqual(Array.from(encodeRow(ROW, spec)), [2.5, 19, 4, 0, 1, 0, 0, 1]);
  });

  test('the same vectors as registry/inputs.encode_rows (text numbers, integer categories, unknown category)', () => {
    const rows = [
      ROW,
      { distance_km: ' 3.25 ', hour: '7', city: 'london', weekday: 0, size: 1 },     // CSV-like text, a whole-number category
      { distance_km: 1e-3, hour: 23, city: 'paris', weekday: 6, size: '3' },         // unknown: all-zero blocks
      { distance_km: '-1.5e2', hour: 0, city: 'amsterdam', weekday: 1, size: '1' },
    ];
    const js = encodeRows(rows, spec).map(v => Array.from(v));
    const py = pythonEncode(rows, SPEC);
    assert.equal(js.length, py.length);
    js.forEach((vector, r) => vector.forEach((x, i) => assert.equal(x, Math.fround(py[r][i]), `row ${r} feature ${i}`)));
  });

  test('refusals name the row and the column', () => {
    const bad = (rows, pattern, code) => assert.throws(() => encodeRows(rows, spec), e => e instanceof InputError && pattern.test(e.message) && (!code || e.code === code), String(pattern));
    const { city, ...noCity } = ROW;
    bad([ROW, noCity], /row 1: missing column "city"/, 'input-column');
    bad([{ ...ROW, colour: 'red' }], /row 0: unknown column "colour"; the columns are: distance_km, hour, city, weekday, size/, 'input-column');
    bad([ROW, ROW, { ...ROW, hour: 'soon' }], /row 2, column "hour": "soon" is not a number/, 'input-type');
    bad([{ ...ROW, hour: '' }], /row 0, column "hour": "" is not a number/);
    bad([{ ...ROW, hour: true }], /row 0, column "hour": true is not a number/);
    bad([{ ...ROW, distance_km: NaN }], /row 0, column "distance_km": NaN is not a finite number/, 'input-nonfinite');
    bad([{ ...ROW, distance_km: 'inf' }], /not a finite number/, 'input-nonfinite');
    bad([{ ...ROW, distance_km: 1e39 }], /not a finite number/);
    bad([{ ...ROW, city: 2.5 }], /row 0, column "city": 2.5 is not a category/);
    bad([[1, 2, 3]], /row 0: expected an object/);
    bad([], /no rows/);
    void city;
    const strict = tabularSpec({ ...SPEC, preprocessing: { ...SPEC.preprocessing, unknown_category: undefined } });
    assert.throws(() => encodeRow({ ...ROW, city: 'paris' }, strict, 3), /row 3, column "city": unknown category "paris"; expected one of: amsterdam, berlin, london/);
    assert.throws(() => pythonEncode([{ ...ROW, city: 'paris' }], { ...SPEC, preprocessing: { ...SPEC.preprocessing, unknown_category: undefined } }),
      /unknown category 'paris'/);
  });

  test('form fields: numeric ranges from the monitoring grid, whole-number columns step by 1', () => {
    const manifest = {
      input: SPEC,
      monitoring: { features: [
        { name: 'distance_km', edges: [0.4000000059604645, 1.19, 2.54, 15.0] },
        { name: 'hour', edges: [10, 12, 19, 23] },
        { name: 'weekday', edges: [0, 1, 2, 3, 4, 5, 6, 6.000006] },
        { name: 'city', categories: ['amsterdam', 'berlin', 'london', '(other)'] },
      ] },
    };
    const fields = Object.fromEntries(formFields(manifest).map(f => [f.name, f]));
    assert.deepEqual(fields.distance_km, { name: 'distance_km', type: 'numeric', min: 0.4, max: 15, step: 'any', value: 1.19 });
    assert.deepEqual(fields.hour, { name: 'hour', type: 'numeric', min: 10, max: 23, step: 1, value: 12 });
    assert.equal(fields.weekday.max, 6);
    assert.equal(fields.weekday.step, 1);
    assert.deepEqual(fields.city.vocabulary, ['amsterdam', 'berlin', 'london']);
    assert.equal(fields.size.type, 'categorical');
  });

  test('nest: a flat sample as nested lists of the input shape', () => {
    assert.deepEqual(nest([1, 2, 3, 4, 5, 6], [3, 2, 1]), [[[1], [2]], [[3], [4]], [[5], [6]]]);
    assert.deepEqual(nest(Float32Array.of(1, 2), [2]), [1, 2]);
  });
});

describe('hybrid serving against a real server', () => {
  let home;
  let server;
  const open = [];
  const rows = [
    { distance_km: 2.4, hour: 19, weekday: 4, prep_time_min: 12, courier_load: 1.1, city: 'berlin' },
    { distance_km: 7.9, hour: 12, weekday: 6, prep_time_min: 20.5, courier_load: 2.3, city: 'london' },
    { distance_km: 0.6, hour: 22, weekday: 1, prep_time_min: 5, courier_load: 0.3, city: 'nowhere' },
  ];

  const client = (options = {}) => {
    const c = createClient({ serverUrl: server.url, model: 'delivery-eta', channel: 'stable', backends: ['cpu'], tf, cache: new MemoryCache(), ...options });
    open.push(c);
    return c;
  };

  before(async () => {
    home = fs.mkdtempSync(path.join(os.tmpdir(), 'pollinate-hybrid-'));
    await pollinate(home, 'train', '--dataset', 'delivery-eta', '--epochs', '2', '--seed', '0');
    await pollinate(home, 'models', 'promote', 'delivery-eta', '1', '--channel', 'stable');
    await pollinate(home, 'train', '--dataset', 'digits', '--epochs', '1', '--seed', '0');
    await pollinate(home, 'models', 'promote', 'digits', '1', '--channel', 'stable');
    server = await startServer(home);
  }, { timeout: 600_000 });

  after(async () => {
    for (const c of open) await c.close().catch(() => {});
    await server?.stop();
    if (home) fs.rmSync(home, { recursive: true, force: true });
  });

  test('local and server paths agree on rows; the request carries the channel and client id', async () => {
    const local = client();
    const lastLoad = await local.load();
    assert.equal(lastLoad.path, 'local');
    assert.equal(local.mode, 'local');
    const remote = client({ mode: 'server', clientId: 'device-7' });
    assert.equal((await remote.load()).path, 'server');
    assert.equal(remote.mode, 'server');
    assert.equal(remote.model, null);
    assert.equal(remote.fetchLog.filter(e => e.kind === 'file').length, 0, 'mode server downloads no model file');

    const here = await local.predict(rows);
    const there = await remote.predict(rows);
    assert.equal(here.length, 3);
    assert.equal(there.length, 3);
    for (let i = 0; i < rows.length; i++) {
      assert.equal(here[i].path, 'local');
      assert.equal(there[i].path, 'server');
      assert.equal(there[i].version, local.version);
      assert.ok(Math.abs(here[i].values[0] - there[i].values[0]) <= 1e-4, `row ${i}: ${here[i].values[0]} vs ${there[i].values[0]}`);
      assert.deepEqual(Array.from(there[i].modelInput), Array.from(here[i].modelInput));
    }
    const request = remote.fetchLog.find(e => e.kind === 'predict');
    const url = new URL(request.url);
    assert.equal(url.pathname, '/v1/models/delivery-eta/predict');
    assert.equal(url.searchParams.get('channel'), 'stable');
    assert.equal(url.searchParams.get('client_id'), 'device-7');
    // one row twice: the server's cache answers the second time (the key is the whole batch)
    assert.equal((await remote.predict(rows[0])).cache, 'miss');
    const again = await remote.predict(rows[0]);
    assert.equal(again.cache, 'hit');
    assert.ok(Math.abs(again.values[0] - here[0].values[0]) <= 1e-4);
    // a bad row is refused here, before any request, naming the column
    const before = remote.fetchLog.length;
    await assert.rejects(remote.predict({ ...rows[0], hour: 'late' }), e => e instanceof InputError && /column "hour"/.test(e.message));
    assert.equal(remote.fetchLog.length, before);
  });

  test('a batch larger than the server takes in one body goes in several requests, in order', async () => {
    const local = client();
    await local.load();
    const remote = client({ mode: 'server' });
    await remote.load();
    const cities = ['amsterdam', 'berlin', 'london', 'madrid', 'warsaw'];
    const many = Array.from({ length: 600 }, (_, i) => ({
      distance_km: 0.4 + (i % 29) / 2, hour: 10 + (i % 14), weekday: i % 7, prep_time_min: 3 + (i % 31), courier_load: 0.1 + (i % 17) / 5, city: cities[i % 5],
    }));
    const there = await remote.predict(many);
    const requests = remote.fetchLog.filter(e => e.kind === 'predict');
    assert.ok(requests.length >= 2, `${requests.length} request(s)`);
    const here = await local.predict(many);
    assert.equal(there.length, many.length);
    const worst = here.reduce((m, r, i) => Math.max(m, Math.abs(r.values[0] - there[i].values[0])), 0);
    assert.ok(worst <= 1e-4, `largest difference ${worst}`);
  });

  const fallbacks = [
    ['no TF.js backend starts', { backends: ['webgl'] }, 'no-backend'],
    ['the model is larger than maxModelBytes', { maxModelBytes: 1000 }, 'too-large'],
    ['TF.js is not given a format the version has', { formats: ['tfjs-graph'] }, 'no-format'],
    ['a model file fails its sha256', { fetch: tamperingFetch('/files/tfjs-layers/') }, 'integrity'],
    ['the model files cannot be fetched', { fetch: blockingFetch('/files/') }, 'network'],
  ];
  for (const [why, options, code] of fallbacks) {
    test(`auto falls back to the server when ${why}`, async () => {
      const c = client({ mode: 'auto', clientId: 'device-9', ...options });
      const fell = new Promise(resolve => c.on('fallback', resolve));
      const loaded = await c.load();
      assert.equal(loaded.path, 'server');
      assert.equal(c.mode, 'server');
      assert.equal(c.fallback.code, code, c.fallback.message);
      assert.equal((await fell).code, code);
      assert.equal(c.info.requestedMode, 'auto');
      const result = await c.predict(rows[1]);
      assert.equal(result.path, 'server');
      assert.equal(result.version, c.version);
      assert.ok(Number.isFinite(result.values[0]) && result.values[0] > 0, String(result.values));
    });
  }

  test('auto stays local when the model loads', async () => {
    const c = client({ mode: 'auto', maxModelBytes: 10_000_000 });
    assert.equal((await c.load()).path, 'local');
    assert.equal(c.fallback, null);
    assert.equal((await c.predict(rows[0])).path, 'local');
  });

  test('digits from the server: the preprocessed input (the local model\'s) gives the local answer', async () => {
    const digit = sampleDigits()[0];
    const local = client({ model: 'digits' });
    await local.load();
    const remote = client({ model: 'digits', mode: 'auto', backends: ['webgl'] });
    await remote.load();
    assert.equal(remote.mode, 'server');
    const a = await local.predict(digit.pixels);
    const b = await remote.predict(digit.pixels);
    assert.equal(b.path, 'server');
    assert.equal(b.label, a.label);
    a.probabilities.forEach((p, i) => assert.ok(Math.abs(p - b.probabilities[i]) <= 1e-4, `class ${i}`));
    await assert.rejects(remote.predict({ pixel: 1 }), e => e instanceof InputError && /not a row of named columns/.test(e.message));
    await assert.rejects(remote.predict([1, 2, 3]), e => e instanceof InputError && e.code === 'input-shape');
  });
});

/** fetch that flips one byte of every response whose URL contains `part`. */
function tamperingFetch(part) {
  return async (url, init) => {
    const response = await fetch(url, init);
    if (!String(url).includes(part) || response.status !== 200) return response;
    const bytes = new Uint8Array(await response.arrayBuffer());
    bytes[bytes.length >> 1] ^= 0x01;
    return new Response(bytes, { status: 200 });
  };
}

/** fetch that cannot reach URLs containing `part` (as a blocked request fails). */
function blockingFetch(part) {
  return async (url, init) => {
    if (String(url).includes(part)) throw new TypeError('fetch failed (blocked)');
    return fetch(url, init);
  };
}
