// Pieces of the library and the page that need no server: hashing, input checks, the
// poller's back-off, the drawing → 8×8 reduction, the cache adapter, the offline file list.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { greyFor, inkFromRgba, readGrid, toDigitGrid } from '../app/drawing.js';
import { MemoryCache } from '../lib/cache.js';
import { InputError } from '../lib/errors.js';
import { inputContract, prepareInput, rankLabels, shapeOf, toProbabilities } from '../lib/input.js';
import { sha256Hex, sha256HexFallback } from '../lib/integrity.js';
import { Poller } from '../lib/poller.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const DIGITS_MANIFEST = {
  name: 'digits', version: 1,
  input: { shape: [8, 8, 1], dtype: 'float32', preprocessing: { scale: 0.0625, offset: 0, source_range: [0, 16], background: 'low' } },
};

describe('sha256', () => {
  test('WebCrypto and the plain-JS fallback agree with Node\'s hash', async () => {
    for (const size of [0, 1, 55, 56, 63, 64, 65, 1000, 153_128]) {
      const bytes = crypto.randomBytes(size);
      const expected = crypto.createHash('sha256').update(bytes).digest('hex');
      assert.equal(await sha256Hex(bytes), expected);
      assert.equal(await sha256Hex(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + size)), expected);
      assert.equal(sha256HexFallback(bytes), expected, `fallback, ${size} bytes`);
    }
  });
});

describe('input contract', () => {
  const contract = inputContract(DIGITS_MANIFEST);

  test('reads shape, size, scale, offset and range from the manifest', () => {
    assert.deepEqual(contract.shape, [8, 8, 1]);
    assert.equal(contract.size, 64);
    assert.equal(contract.scale, 0.0625);
    assert.deepEqual(contract.range, [0, 16]);
    const plain = inputContract({ input: { shape: [3] } });
    assert.equal(plain.scale, 1);
    assert.equal(plain.offset, 0);
    assert.equal(plain.range, null);
    assert.throws(() => inputContract({ name: 'x', version: 1, input: {} }), e => e.code === 'model-format');
  });

  test('shapeOf handles nesting, typed arrays and ragged input', () => {
    assert.deepEqual(shapeOf([[1, 2], [3, 4], [5, 6]]), [3, 2]);
    assert.deepEqual(shapeOf([new Float32Array(4), new Float32Array(4)]), [2, 4]);
    assert.deepEqual(shapeOf([]), [0]);
    assert.throws(() => shapeOf([[1], [1, 2]]), InputError);
  });

  test('prepareInput scales, and rejects with the position of the bad value', () => {
    const out = prepareInput(new Array(64).fill(16), contract);
    assert.ok(out instanceof Float32Array);
    assert.ok(out.every(v => v === 1));
    assert.throws(() => prepareInput(Object.assign(new Array(64).fill(0), { 10: NaN }), contract),
      e => e.code === 'input-nonfinite' && e.index === 10 && /input\[1, 2, 0\]/.test(e.message));
    assert.throws(() => prepareInput(new Array(65).fill(0), contract), e => e.code === 'input-shape' && e.received[0] === 65);
    assert.throws(() => prepareInput(undefined, contract), e => e.code === 'input-type');
    // the range allows float noise at the edges, nothing more
    prepareInput(Object.assign(new Array(64).fill(0), { 0: 16 + 1e-9 }), contract);
    assert.throws(() => prepareInput(Object.assign(new Array(64).fill(0), { 0: 16.01 }), contract), e => e.code === 'input-range');
  });

  test('probabilities: kept when they sum to one, else softmax; ranked most likely first', () => {
    assert.deepEqual(Array.from(toProbabilities([0.25, 0.75])), [0.25, 0.75]);
    const soft = toProbabilities([1, 1, 1, 1]);
    soft.forEach(p => assert.ok(Math.abs(p - 0.25) < 1e-7));
    const ranked = rankLabels([0.1, 0.6, 0.3], ['a', 'b', 'c']);
    assert.deepEqual(ranked.map(r => r.label), ['b', 'c', 'a']);
    assert.deepEqual(rankLabels([0.5, 0.5], null).map(r => r.label), ['0', '1']);
  });
});

describe('poller', () => {
  function fakeClock() {
    const timers = [];
    return {
      timers,
      setTimer: (fn, ms) => { const t = { fn, ms }; timers.push(t); return t; },
      clearTimer: t => { t.cleared = true; },
      async fire() {
        const t = timers.at(-1);
        await t.fn();
        return t.ms;
      },
    };
  }

  test('steady while checks succeed, doubling up to the cap while they fail, reset on success', async () => {
    const clock = fakeClock();
    let fail = true;
    const errors = [];
    const poller = new Poller(async () => { if (fail) throw new Error('down'); }, {
      intervalMs: 100, maxIntervalMs: 500, jitter: 0, setTimer: clock.setTimer, clearTimer: clock.clearTimer,
      onError: (e, next) => errors.push(next),
    }).start();
    const delays = [clock.timers[0].ms];
    for (let i = 0; i < 5; i++) {
      await clock.fire();
      delays.push(clock.timers.at(-1).ms);
    }
    assert.deepEqual(delays, [100, 200, 400, 500, 500, 500]);
    assert.deepEqual(errors, [200, 400, 500, 500, 500]);
    fail = false;
    await clock.fire();
    assert.equal(clock.timers.at(-1).ms, 100);
    assert.equal(poller.failures, 0);
    const count = clock.timers.length;
    poller.stop();
    assert.equal(clock.timers.at(-1).cleared, true);
    await clock.timers.at(-1).fn();  // a timer that fires after stop() does nothing
    assert.equal(clock.timers.length, count);
  });

  test('jitter spreads the delay by at most ±jitter', () => {
    const clock = fakeClock();
    new Poller(async () => {}, { intervalMs: 1000, jitter: 0.1, random: () => 0, setTimer: clock.setTimer }).start();
    new Poller(async () => {}, { intervalMs: 1000, jitter: 0.1, random: () => 0.999999, setTimer: clock.setTimer }).start();
    assert.deepEqual(clock.timers.map(t => t.ms), [900, 1100]);
    assert.throws(() => new Poller(async () => {}, { intervalMs: 0 }), RangeError);
  });
});

describe('drawing → 8×8', () => {
  const W = 280;

  function canvasOf(paint) {
    const rgba = new Uint8ClampedArray(W * W * 4).fill(255);
    paint((x, y, grey) => {
      const p = (y * W + x) * 4;
      rgba[p] = rgba[p + 1] = rgba[p + 2] = grey;
    });
    return inkFromRgba(rgba, W, W);
  }

  test('a painted 8×8 image reads back to within 1/255 of the range', () => {
    const values = Array.from({ length: 64 }, (_, i) => (i * 7) % 17);
    const ink = canvasOf(set => {
      for (let y = 0; y < W; y++) for (let x = 0; x < W; x++) set(x, y, greyFor(values[Math.floor(y / 35) * 8 + Math.floor(x / 35)]));
    });
    readGrid(ink, W, W).forEach((v, i) => assert.ok(Math.abs(v - values[i]) <= 16 / 255 + 1e-6, `cell ${i}: ${v} vs ${values[i]}`));
  });

  test('a freehand drawing is cropped, scaled to full height, centred and counted per 4×4 block', () => {
    // a small ring drawn in the top-left corner
    const ink = canvasOf(set => {
      for (let y = 0; y < W; y++) {
        for (let x = 0; x < W; x++) {
          const r = Math.hypot((x - 60) / 30, (y - 70) / 45);
          if (r > 0.7 && r < 1) set(x, y, 0);
        }
      }
    });
    const grid = toDigitGrid(ink, W, W);
    assert.equal(grid.length, 64);
    assert.ok(grid.every(v => Number.isInteger(v) && v >= 0 && v <= 16));
    const rows = Array.from({ length: 8 }, (_, r) => grid.slice(r * 8, r * 8 + 8));
    assert.ok(rows[0].some(v => v > 0) && rows[7].some(v => v > 0), 'spans the full height');
    const columns = Array.from({ length: 8 }, (_, c) => rows.reduce((s, row) => s + row[c], 0));
    assert.equal(columns[0] + columns[7], 0, 'centred: the outer columns stay empty');
    assert.ok(Math.abs(columns[2] - columns[5]) <= 8 && Math.abs(columns[1] - columns[6]) <= 8, `symmetric: ${columns}`);
    assert.ok(rows[3][3] + rows[3][4] + rows[4][3] + rows[4][4] < 8, 'the hole stays empty');
    assert.equal(toDigitGrid(canvasOf(() => {}), W, W), null);
  });
});

describe('cache adapter', () => {
  test('MemoryCache stores copies, like IndexedDB', async () => {
    const cache = new MemoryCache();
    const value = { files: [{ name: 'a', data: new Uint8Array([1, 2, 3]).buffer }] };
    await cache.set('model/x/1', value);
    new Uint8Array(value.files[0].data)[0] = 9;
    const got = await cache.get('model/x/1');
    assert.deepEqual(Array.from(new Uint8Array(got.files[0].data)), [1, 2, 3]);
    assert.deepEqual(await cache.keys('model/'), ['model/x/1']);
    await cache.delete('model/x/1');
    assert.equal(await cache.get('model/x/1'), undefined);
  });
});

describe('offline page files', () => {
  const sw = fs.readFileSync(path.join(ROOT, 'sw.js'), 'utf8');
  const listed = new Set([...sw.matchAll(/'\.\/([^']*)'/g)].map(m => m[1]));

  test('the service worker caches every file the page loads', () => {
    const pageFiles = ['index.html', 'pollinate.js',
      ...fs.readdirSync(path.join(ROOT, 'lib')).map(f => `lib/${f}`),
      ...fs.readdirSync(path.join(ROOT, 'app')).map(f => `app/${f}`)];
    for (const file of pageFiles) assert.ok(listed.has(file), `sw.js does not cache ${file}`);
  });

  test('every cached file and every import-map target exists', () => {
    const html = fs.readFileSync(path.join(ROOT, 'index.html'), 'utf8');
    const importMap = JSON.parse(/<script type="importmap">([\s\S]*?)<\/script>/.exec(html)[1]);
    const targets = Object.values(importMap.imports).map(t => t.replace(/^\.\//, ''));
    for (const file of [...listed, ...targets]) {
      if (file === '') continue;
      assert.ok(fs.existsSync(path.join(ROOT, file)), `${file} is missing (npm ci in web_client/?)`);
    }
    const tfjsVersion = JSON.parse(fs.readFileSync(path.join(ROOT, 'node_modules/@tensorflow/tfjs/package.json'), 'utf8')).version;
    assert.match(sw, new RegExp(`TFJS_VERSION = '${tfjsVersion.replace(/\./g, '\\.')}'`), 'sw.js cache name follows the installed TF.js');
  });

  test('TF.js comes from vendor/ (vendor.json), never node_modules/, in the page, the app and sw.js', () => {
    const spec = JSON.parse(fs.readFileSync(path.join(ROOT, 'vendor.json'), 'utf8'));
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
    assert.equal(spec.tfjs_version, pkg.dependencies['@tensorflow/tfjs'], 'vendor.json follows package.json');
    const vendored = new Set(Object.keys(spec.files).map(f => `${spec.folder}/${f}`));
    const html = fs.readFileSync(path.join(ROOT, 'index.html'), 'utf8');
    const importMap = JSON.parse(/<script type="importmap">([\s\S]*?)<\/script>/.exec(html)[1]);
    for (const target of Object.values(importMap.imports)) {
      const file = target.replace(/^\.\//, '');
      assert.ok(!file.includes('node_modules'), `${file}: an installed package has no node_modules`);
      if (file.startsWith('vendor/')) assert.ok(vendored.has(file), `${file} is not in vendor.json`);
    }
    for (const file of listed) {
      if (file.startsWith('vendor/')) assert.ok(vendored.has(file), `sw.js caches ${file}, which vendor.json does not ship`);
      assert.ok(!file.includes('node_modules'), `sw.js caches ${file}`);
    }
    const app = fs.readFileSync(path.join(ROOT, 'app', 'app.js'), 'utf8');
    assert.match(app, /new URL\('\.\.\/vendor\/tfjs\/'/, 'the wasm binaries come from vendor/tfjs/');
    for (const f of Object.keys(spec.files)) assert.ok(fs.existsSync(path.join(ROOT, spec.folder, f)), `${spec.folder}/${f} (npm run vendor)`);
    assert.ok(fs.existsSync(path.join(ROOT, spec.folder, spec.licenses)), 'the licences ship with the files');
  });
});

describe('backend choice', () => {
  test('a software-rendered WebGL is recognised by its renderer name', async () => {
    const { softwareWebglRenderer } = await import('../lib/backend.js');
    assert.equal(softwareWebglRenderer(), null, 'no canvas in Node');
    const original = globalThis.OffscreenCanvas;
    const fakeCanvas = renderer => class {
      getContext() {
        return { RENDERER: 1, getExtension: name => (name === 'WEBGL_debug_renderer_info' ? { UNMASKED_RENDERER_WEBGL: 2 } : null), getParameter: () => renderer };
      }
    };
    try {
      globalThis.OffscreenCanvas = fakeCanvas('ANGLE (Google, Vulkan 1.3.0 (SwiftShader Device (Subzero)), SwiftShader driver)');
      assert.match(softwareWebglRenderer(), /SwiftShader/);
      globalThis.OffscreenCanvas = fakeCanvas('llvmpipe (LLVM 15.0.6, 256 bits)');
      assert.match(softwareWebglRenderer(), /llvmpipe/);
      globalThis.OffscreenCanvas = fakeCanvas('ANGLE (NVIDIA, NVIDIA GeForce RTX 3060 Direct3D11 vs_5_0 ps_5_0, D3D11)');
      assert.equal(softwareWebglRenderer(), null);
    } finally {
      globalThis.OffscreenCanvas = original;
    }
  });
});

describe('createClient', () => {
  test('refuses a bad configuration at once, before any request', async () => {
    const { createClient, PollinateError } = await import('../pollinate.js');
    const base = { serverUrl: 'http://127.0.0.1:9', model: 'digits' };
    for (const [options, pattern] of [
      [{ ...base, model: 'Digits' }, /model must be a model name/],
      [{ ...base, model: undefined }, /model must be a model name/],
      [{ ...base, channel: 'Stable!' }, /channel must match/],
      [{ ...base, serverUrl: undefined }, /serverUrl is required/],
    ]) {
      assert.throws(() => createClient(options), e => e instanceof PollinateError && e.code === 'config' && pattern.test(e.message));
    }
    const client = createClient(base);
    assert.equal(client.version, null);
    assert.equal(client.info, null);
    assert.match(client.manifestUrl(), /^http:\/\/127\.0\.0\.1:9\/v1\/models\/digits\/manifest\?channel=stable$/);
    assert.match(createClient({ ...base, clientId: 'a b' }).manifestUrl(), /client_id=a\+b$/);
  });
});
