// What a device does to learn, without a server: match a task's weight list to a real TF.js
// model, read and write its weights, compute local − base and its little-endian bytes, train
// on a backend that can (wasm cannot: cpu, and back), cancel, keep examples, and refuse to
// contribute without the user's consent. Real @tensorflow/tfjs (cpu and wasm backends).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { createClient, MemoryCache, PollinateError } from '../pollinate.js';
import { chooseBackend } from '../lib/backend.js';
import { ExampleStore } from '../lib/examples.js';
import { refusalOf } from '../lib/protocol.js';
import { classCount, fitOnExamples, trainingBackendFor, withBackend } from '../lib/training.js';
import {
  flatSize, float32LE, fromFloat32LE, l2Norm, readFlat, weightDelta, weightsInSpecOrder, writeFlat,
} from '../lib/weights.js';

const tfModule = await import('@tensorflow/tfjs');
const tf = tfModule.default?.loadLayersModel ? tfModule.default : tfModule;

before(async () => {
  await tf.setBackend('cpu');
});

after(async () => {
  await tf.setBackend('cpu');
});

let built = 0;

/** The digits CNN's shape (conv → conv → pool → dense → softmax) plus a BatchNormalization,
 * built the way Keras names it: each layer's variables under the layer's name. */
function digitsLikeModel({ batchNorm = true } = {}) {
  built += 1;
  const input = tf.input({ shape: [8, 8, 1], name: `image_${built}` });
  let x = tf.layers.conv2d({ filters: 4, kernelSize: 3, padding: 'same', activation: 'relu', name: 'conv1' }).apply(input);
  if (batchNorm) x = tf.layers.batchNormalization({ name: 'bn' }).apply(x);
  x = tf.layers.maxPooling2d({ poolSize: 2, name: 'pool' }).apply(x);
  x = tf.layers.flatten({ name: 'flatten' }).apply(x);
  x = tf.layers.dense({ units: 8, activation: 'relu', name: 'dense' }).apply(x);
  const output = tf.layers.dense({ units: 10, activation: 'softmax', name: 'probabilities' }).apply(x);
  return tf.model({ inputs: input, outputs: output });
}

/** The model's weights in Keras `get_weights()` order (each layer's variables together, in
 * the order Keras creates them), as a task's `weights` list. */
function kerasSpec({ batchNorm = true } = {}) {
  return [
    { name: 'conv1/kernel', shape: [3, 3, 1, 4], dtype: 'float32' },
    { name: 'conv1/bias', shape: [4], dtype: 'float32' },
    ...(batchNorm ? [
      { name: 'bn/gamma', shape: [4], dtype: 'float32' },
      { name: 'bn/beta', shape: [4], dtype: 'float32' },
      { name: 'bn/moving_mean', shape: [4], dtype: 'float32' },
      { name: 'bn/moving_variance', shape: [4], dtype: 'float32' },
    ] : []),
    { name: 'dense/kernel', shape: [64, 8], dtype: 'float32' },
    { name: 'dense/bias', shape: [8], dtype: 'float32' },
    { name: 'probabilities/kernel', shape: [8, 10], dtype: 'float32' },
    { name: 'probabilities/bias', shape: [10], dtype: 'float32' },
  ];
}

/** n labelled examples in the model's input spec (values 0..1), labels 0..9. */
function examples(n, seed = 1) {
  let s = seed;
  const random = () => ((s = (s * 16807) % 2147483647) / 2147483647);
  return Array.from({ length: n }, (_, i) => ({ input: Float32Array.from({ length: 64 }, random), label: i % 10 }));
}

describe('weights in the task\'s order', () => {
  test('TF.js lists BatchNormalization statistics last; the task\'s Keras order is matched by name', () => {
    const model = digitsLikeModel();
    const spec = kerasSpec();
    // TF.js' own order differs from Keras' (trainable first): position alone would be wrong
    assert.notDeepEqual(model.weights.map(w => w.originalName), spec.map(w => w.name));
    const ordered = weightsInSpecOrder(model, spec);
    assert.deepEqual(ordered.map(v => v.originalName), spec.map(w => w.name));
    assert.deepEqual(ordered.map(v => v.shape), spec.map(w => w.shape));
    model.dispose();
  });

  test('a second copy of the model (TF.js renames its variables conv1/kernel_1) still matches', () => {
    const first = digitsLikeModel();
    const second = digitsLikeModel();
    assert.ok(second.weights.some(w => w.name !== w.originalName), 'TF.js uniquified the second copy\'s names');
    const ordered = weightsInSpecOrder(second, kerasSpec());
    assert.deepEqual(ordered.map(v => v.originalName), kerasSpec().map(w => w.name));
    // Keras 2 style paths carry the model's name in front
    const prefixed = kerasSpec().map(w => ({ ...w, name: `cnn/${w.name}` }));
    assert.deepEqual(weightsInSpecOrder(second, prefixed).map(v => v.originalName), kerasSpec().map(w => w.name));
    first.dispose();
    second.dispose();
  });

  test('a list that does not fit the model is refused with the array named', () => {
    const model = digitsLikeModel({ batchNorm: false });
    const spec = kerasSpec({ batchNorm: false });
    const refused = (s, pattern) => assert.throws(() => weightsInSpecOrder(model, s),
      e => e instanceof PollinateError && e.code === 'weights-mismatch' && pattern.test(e.message));
    refused(spec.slice(1), /lists 5 weight arrays; this model has 6/);
    refused(spec.map((w, i) => (i === 2 ? { ...w, shape: [64, 9] } : w)), /dense\/kernel\) has shape \[64,9\]; the model's dense\/kernel has \[64,8\]/);
    refused(spec.map((w, i) => (i === 0 ? { ...w, name: 'conv9/kernel' } : w)), /conv9\/kernel.*is not a weight of this model/);
    refused(spec.map((w, i) => (i === 0 ? { ...w, dtype: 'int8' } : w)), /int8/);
    refused([], /no weights/);
    // generic names (a gateway that sends none): by position, still checked by shape
    const generic = spec.map((w, i) => ({ ...w, name: `weight_${i}` }));
    assert.deepEqual(weightsInSpecOrder(model, generic), model.weights);
    refused([generic[1], generic[0], ...generic.slice(2)], /weight_1\) has shape \[4\]/);
    model.dispose();
  });
});

describe('local − base and its bytes', () => {
  test('base weights written in task order read back exactly; after training, the delta is local − base per array', async () => {
    const model = digitsLikeModel();
    const spec = kerasSpec();
    const variables = weightsInSpecOrder(model, spec);
    const size = flatSize(spec);
    assert.equal(size, 36 + 4 + 16 + 512 + 8 + 80 + 10);
    const base = Float32Array.from({ length: size }, (_, i) => Math.sin(i) * 0.1);
    // moving variance must stay positive for BatchNormalization to be sane
    const offset = 36 + 4 + 12;
    for (let i = 0; i < 4; i++) base[offset + i] = 1 + i / 10;
    writeFlat(tf, variables, base);
    assert.deepEqual(readFlat(variables), base);
    // the write really lands in the variable named by the spec (conv1/bias is values 36..39)
    assert.deepEqual(Array.from(variables[1].read().dataSync()), Array.from(base.subarray(36, 40)));

    const fit = await fitOnExamples(tf, model, examples(20), { inputShape: [8, 8, 1], epochs: 2, batchSize: 8, learningRate: 0.01 });
    const local = readFlat(variables);
    const delta = weightDelta(local, base);
    assert.equal(delta.length, size);
    let start = 0;
    for (const [i, v] of variables.entries()) {
      const values = v.read().dataSync();
      for (let k = 0; k < values.length; k += 7) assert.equal(delta[start + k], Math.fround(values[k] - base[start + k]), `${spec[i].name}[${k}]`);
      start += values.length;
    }
    assert.ok(l2Norm(delta) > 0 && Number.isFinite(l2Norm(delta)));
    assert.ok(delta.every(Number.isFinite));
    // (whether the loss falls is asserted on the real digits model, in client.test.mjs and in Chromium)
    assert.ok(fit.losses.length === 2 && [fit.lossBefore, fit.lossAfter, ...fit.losses].every(Number.isFinite));
    model.dispose();
  });

  test('the body is little-endian float32, 4 bytes per value, in order; reading refuses a wrong length', () => {
    const values = Float32Array.from([1, -2.5, 3.25e-8, 0, -0, 65504, 1e30]);
    const bytes = float32LE(values);
    assert.equal(bytes.byteLength, values.length * 4);
    const view = new DataView(bytes);
    values.forEach((v, i) => assert.equal(view.getFloat32(i * 4, true), v));
    assert.deepEqual(Array.from(new Uint8Array(bytes, 0, 4)), [0x00, 0x00, 0x80, 0x3f]);  // 1.0f LE
    assert.deepEqual(fromFloat32LE(bytes, values.length), values);
    assert.deepEqual(fromFloat32LE(new Uint8Array(bytes)), values);
    assert.throws(() => fromFloat32LE(bytes, values.length + 1), e => e.code === 'weights-mismatch' && /expected 32 \(8 float32 values\)/.test(e.message));
    assert.throws(() => fromFloat32LE(bytes.slice(0, 6)), e => e.code === 'weights-mismatch' && /multiple of 4/.test(e.message));
    // a view into a bigger buffer sends only its own values
    const big = new Float32Array([9, 8, 7, 6]);
    assert.deepEqual(new Float32Array(float32LE(big.subarray(1, 3))), new Float32Array([8, 7]));
  });

  test('the delta refuses different lengths and non-finite values; the norm is the L2 norm', () => {
    assert.deepEqual(weightDelta(Float32Array.from([1, 2, 3]), Float32Array.from([0.5, 2, 4])), Float32Array.from([0.5, 0, -1]));
    assert.throws(() => weightDelta(new Float32Array(3), new Float32Array(2)), e => e.code === 'weights-mismatch');
    assert.throws(() => weightDelta(Float32Array.from([NaN]), Float32Array.from([0])), e => e.code === 'non-finite');
    assert.throws(() => weightDelta(Float32Array.from([Infinity]), Float32Array.from([0])), e => e.code === 'non-finite');
    assert.equal(l2Norm(Float32Array.from([3, 4])), 5);
  });
});

describe('training backend', () => {
  test('wasm cannot train a CNN (no Conv2DBackpropFilter): training moves to cpu and back', async () => {
    const chosen = await chooseBackend(tf, { backends: ['wasm'], loadWasm: () => import('@tensorflow/tfjs-backend-wasm') });
    assert.equal(chosen.name, 'wasm');
    try {
      const model = digitsLikeModel({ batchNorm: false });
      const data = examples(10);
      // the reason, measured: TF.js wasm itself refuses the convolution's gradient
      await assert.rejects(fitOnExamples(tf, model, data, { inputShape: [8, 8, 1] }), /Conv2DBackpropFilter/);
      const plan = trainingBackendFor('wasm');
      assert.equal(plan.name, 'cpu');
      assert.match(plan.reason, /Conv2DBackpropFilter/);
      const fit = await withBackend(tf, plan.name, async () => {
        assert.equal(tf.getBackend(), 'cpu');
        return fitOnExamples(tf, model, data, { inputShape: [8, 8, 1], epochs: 2, batchSize: 5 });
      });
      assert.equal(tf.getBackend(), 'wasm', 'back on the inference backend');
      assert.equal(fit.losses.length, 2);
      assert.ok(fit.seconds > 0);
      // the trained variables serve inference on wasm
      const out = model.predict(tf.tensor(data[0].input, [1, 8, 8, 1]));
      assert.equal(out.shape.join(), '1,10');
      assert.ok(Math.abs(out.sum().dataSync()[0] - 1) < 1e-5);
      model.dispose();
      assert.equal(trainingBackendFor('webgl').name, 'webgl');
      assert.equal(trainingBackendFor('cpu').name, 'cpu');
      assert.equal(trainingBackendFor('wasm', 'cpu').reason, 'requested');
    } finally {
      await tf.setBackend('cpu');
    }
  });

  test('a graph model or a regressor is refused clearly; bad labels and inputs name the example', async () => {
    assert.throws(() => classCount(new tf.GraphModel('memory://none')), e => e.code === 'not-trainable' && /graph model/.test(e.message));
    const input = tf.input({ shape: [3] });
    const regressor = tf.model({ inputs: input, outputs: tf.layers.dense({ units: 1 }).apply(input) });
    assert.throws(() => classCount(regressor), e => e.code === 'not-trainable' && /not a classifier/.test(e.message));
    const model = digitsLikeModel({ batchNorm: false });
    const fit = data => fitOnExamples(tf, model, data, { inputShape: [8, 8, 1] });
    await assert.rejects(fit([]), e => e.code === 'no-examples');
    await assert.rejects(fit([{ input: new Float32Array(64), label: 10 }]), e => e.code === 'label' && /0\.\.9/.test(e.message));
    await assert.rejects(fit([{ input: new Float32Array(63), label: 1 }]), e => e.code === 'input-shape' && /63/.test(e.message));
    await assert.rejects(fit([{ input: Float32Array.from({ length: 64 }, () => NaN), label: 1 }]), e => e.code === 'input-nonfinite');
    await assert.rejects(fitOnExamples(tf, model, examples(2), { inputShape: [8, 8, 1], epochs: 0 }), e => e.code === 'config');
    model.dispose();
    regressor.dispose();
  });
});

describe('cancel', () => {
  test('aborting during training stops at the end of the batch and rejects with code aborted', async () => {
    const model = digitsLikeModel({ batchNorm: false });
    const controller = new AbortController();
    const seen = [];
    const started = Date.now();
    await assert.rejects(
      fitOnExamples(tf, model, examples(40), {
        inputShape: [8, 8, 1], epochs: 50, batchSize: 4,
        onEpoch: e => {
          seen.push(e.epoch);
          if (e.epoch === 2) controller.abort(new Error('user switched it off'));
        },
        signal: controller.signal,
      }),
      e => e instanceof PollinateError && e.code === 'aborted' && /user switched it off/.test(e.message),
    );
    assert.deepEqual(seen, [1, 2], 'no epoch after the abort');
    assert.ok(Date.now() - started < 20_000);
    model.dispose();
  });

  test('an aborted signal stops a contribution before anything is asked of the network', async () => {
    const client = createClient({ serverUrl: 'http://127.0.0.1:9', model: 'digits', backends: ['cpu'], cache: new MemoryCache() });
    await client.optIn();
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(client.contribute({ signal: controller.signal }), e => e.code === 'aborted');
    assert.deepEqual(client.fetchLog, []);
  });
});

describe('consent and examples', () => {
  test('contribute() refuses until the user opts in; the choice is kept in storage', async () => {
    const cache = new MemoryCache();
    const make = () => createClient({ serverUrl: 'http://127.0.0.1:9', model: 'digits', backends: ['cpu'], cache });
    const client = make();
    assert.equal(await client.optedIn(), false);
    await assert.rejects(client.contribute(), e => e instanceof PollinateError && e.code === 'not-opted-in'
      && /consent/.test(e.message) && /optIn\(\)/.test(e.message));
    assert.deepEqual(client.fetchLog, [], 'nothing was sent');

    await client.optIn();
    const later = make();  // a reload: same storage, new client
    assert.equal(await later.optedIn(), true);
    // opted in, but nothing to learn from: done without a request
    assert.deepEqual(await later.contribute(), { status: 'no-examples', examples: 0 });
    assert.deepEqual(later.fetchLog, []);

    await later.optOut();
    assert.equal(await make().optedIn(), false);
    await assert.rejects(make().contribute(), e => e.code === 'not-opted-in');
    // another server or model has its own consent
    const other = createClient({ serverUrl: 'http://127.0.0.1:9', model: 'eta', backends: ['cpu'], cache });
    await client.optIn();
    assert.equal(await other.optedIn(), false);
  });

  test('examples are kept (oldest first), checked, capped and cleared', async () => {
    const cache = new MemoryCache();
    const store = new ExampleStore(cache, 'examples/x/digits/', { limit: 3 });
    assert.equal(await store.count(), 0);
    for (let i = 0; i < 5; i++) await store.add(new Float32Array(64).fill(i / 10), i, { size: 64, classes: 10, version: 1 });
    const kept = await store.list();
    assert.deepEqual(kept.map(e => e.label), [2, 3, 4], 'the newest three');
    assert.ok(kept[0].input instanceof Float32Array && kept[0].input.length === 64);
    assert.ok(Math.abs(kept[0].input[0] - 0.2) < 1e-7);
    await assert.rejects(store.add(new Float32Array(63), 1, { size: 64, classes: 10 }), e => e.code === 'input-shape');
    await assert.rejects(store.add(new Float32Array(64), 10, { size: 64, classes: 10 }), e => e.code === 'label');
    await assert.rejects(store.add(new Float32Array(64).fill(NaN), 1, { size: 64 }), e => e.code === 'input-nonfinite');
    // other keys in the same cache are not touched
    await cache.set('model/x/digits/1/tfjs-layers', { files: [] });
    assert.equal(await store.clear(), 3);
    assert.deepEqual(await cache.keys(''), ['model/x/digits/1/tfjs-layers']);
  });

  test('refusals are named the way the protocol means them', () => {
    const http = (status, detail) => new PollinateError('http', `answered ${status}`, { status, detail });
    assert.equal(refusalOf(http(401, 'a device token is needed')), 'unauthorized');
    assert.equal(refusalOf(http(409, 'this device already sent its update for task t')), 'duplicate');
    assert.equal(refusalOf(http(409, 'task t is round 3, which is closed: fetch the current task')), 'stale');
    assert.equal(refusalOf(http(404, 'no task')), 'unknown_task');
    assert.equal(refusalOf(http(413, 'over')), 'too_large');
    assert.equal(refusalOf(http(422, 'norm')), 'invalid');
    assert.equal(refusalOf(http(500, 'boom')), null);
    assert.equal(refusalOf(new PollinateError('network', 'down')), null);
  });
});
