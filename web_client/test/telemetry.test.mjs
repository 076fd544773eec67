// Field telemetry (docs/monitoring.md): the features and bins without a server, then a real
// `pollinate serve`: batches flushed every N predictions are merged into the version's
// window, a batch the server cannot take waits in the offline queue and goes later, feedback
// joins a prediction by its id, the shadow version runs beside the served one, and nothing
// is sent before the user opts in. Real @tensorflow/tfjs (cpu), a real store and server.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createClient, MemoryCache } from '../pollinate.js';
import { binIndex, featureValues, inputKind, newPredictionId, TelemetryQueue, VersionAggregate } from '../lib/telemetry.js';
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
