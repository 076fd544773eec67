#!/usr/bin/env node
// Runs a TensorFlow.js model (LayersModel or graph model) under Node with pure @tensorflow/tfjs (cpu or wasm backend),
// the same library a browser loads. Pollinate uses it to prove that an exported model.json
// computes what the Keras model computes, to time it, and to check that it trains.
//
// Protocol (export/node_runner.py is the Python side). One request per process:
//
//   node run_tfjs.mjs predict (--model DIR | --url URL) --input X.npy [--input X2.npy ...]
//        [--shape 1,8,8,1] [--backend cpu|wasm] [--batch-size 256]
//        [--latency-repeats 50] [--warmup 5] --out DIR [--output-format npy|bin|json]
//
//   node run_tfjs.mjs fit (--model DIR | --url URL) --x X.npy [--x X2.npy ...] --y Y.npy
//        --loss NAME [--optimizer adam] [--learning-rate 0.001] [--steps 10]
//        [--batch-size 32] [--backend cpu|wasm] [--x-shape ... --y-shape ...] --out DIR
//
// --model DIR reads DIR/model.json and the weight shards it lists from disk and loads them with
// tf.io.fromMemory; --url loads over HTTP with tf.loadLayersModel(url) (the browser's path).
// Both kinds of TF.js model load, told apart by model.json's "format": a LayersModel
// ("layers-model": tf.loadLayersModel, predict and fit) or a graph model ("graph-model":
// tf.loadGraphModel, predict only; execute(), or executeAsync() when the graph has control
// flow). Reports say which: "kind": "layers" | "graph".
// Inputs are .npy files (float32/float64/int32/int64/uint8, C order), or raw little-endian
// float32 files (.bin or anything else) whose shape --shape gives (one --shape per --input,
// in order). Inputs are cast to float32 (TF.js casts again where a layer needs int32).
//
// predict writes DIR/output_<i>.npy (or .bin: raw float32; or nothing: json puts the values in
// the report), and DIR/report.json:
//   {"mode": "predict", "backend": "cpu", "tfjs_version": "4.22.0", "load_ms": 12.3,
//    "outputs": [{"shape": [n, ...], "file": "output_0.npy"}],
//    "latency_ms": {"warmup": 5, "repeats": 50, "median": 0.41, "p90": 0.52, "mean": ...,
//                   "min": ..., "max": ...},
//    "wasm": {"simd": true, "threads": false}}            (wasm backend only)
// Latency is single-sample: the first sample of each input, `warmup` untimed predicts, then
// `repeats` timed predicts, each waiting for the values (dataSync) so the timing is honest.
//
// fit compiles the loaded model with the optimizer, learning rate and loss, then runs `steps`
// trainOnBatch calls on consecutive batches (wrapping around) and writes
//   {"mode": "fit", "backend": "cpu", "losses": [2.31, 2.10, ...], ...}
// Loss and optimizer names may be TF.js names (categoricalCrossentropy) or Keras ones
// (categorical_crossentropy, mse). tfjs-backend-wasm 4.22 has no Conv2DBackpropFilter kernel:
// train convolutional models on cpu (browsers: webgl).
//
// Exit status 0 on success; on failure "error: MESSAGE" on stderr and exit status 1 (2 for bad
// arguments). Nothing useful is printed on stdout.
//
// Many requests per process (what Python uses: starting Node and TF.js costs more than a
// small model's whole check):
//
//   node run_tfjs.mjs serve
//
// reads one JSON request per line on stdin and answers one JSON line on stdout, in order:
//   {"id": 7, "mode": "predict", "args": {"model": DIR, "input": ["X.npy"], "backend": "wasm",
//    "latency-repeats": 50, "out": DIR, ...}}          (args: the flags above, without "--")
//   -> {"id": 7, "ok": true, "report": {...the report.json above...}}
//   -> {"id": 7, "ok": false, "error": "MESSAGE", "usage": false}
//   {"id": 8, "mode": "hello"} -> {"id": 8, "ok": true, "report": {"tfjs_version": ..., "node": ...,
//    "pid": ..., "num_tensors": 0}}
// Each request loads its model on the backend it names and disposes it afterwards; output
// arrays still go to files under "out". Anything TF.js logs goes to stderr. The process
// exits when stdin closes.
//
// Built for the package (npm run build): esbuild bundles this file with its dependencies
// into dist/run_tfjs.mjs, next to the wasm backend's .wasm files and the licences; the
// bundle needs no node_modules.
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { registerMissingKernels } from '../../web_client/lib/backend.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));

class UsageError extends Error {}

const REPEATED = new Set(['input', 'shape', 'x', 'x-shape', 'y-shape']);

function parseArgs(argv) {
  const [mode, ...rest] = argv;
  const args = { mode };
  for (let i = 0; i < rest.length; i++) {
    const flag = rest[i];
    if (!flag.startsWith('--')) throw new UsageError(`unexpected argument ${JSON.stringify(flag)}`);
    const key = flag.slice(2);
    const value = rest[i + 1];
    if (value === undefined) throw new UsageError(`${flag} needs a value`);
    i++;
    if (REPEATED.has(key)) (args[key] ??= []).push(value);
    else args[key] = value;
  }
  return checkArgs(args);
}

// The same checks for command-line flags and for a serve request's "args" (strings or numbers).
function checkArgs(raw) {
  const { mode } = raw;
  if (mode !== 'predict' && mode !== 'fit') {
    throw new UsageError(`mode must be "predict" or "fit", got ${JSON.stringify(mode)}`);
  }
  const args = { mode };
  for (const [key, value] of Object.entries(raw)) {
    if (key === 'mode') continue;
    if (REPEATED.has(key)) {
      const list = Array.isArray(value) ? value : [value];
      if (list.some(v => typeof v !== 'string')) throw new UsageError(`${key} must be a list of strings`);
      args[key] = list;
    } else if (value != null) {
      if (typeof value !== 'string' && typeof value !== 'number') throw new UsageError(`${key} must be a string or a number`);
      args[key] = String(value);
    }
  }
  for (const key of REPEATED) args[key] ??= [];
  if ((args.model == null) === (args.url == null)) throw new UsageError('give exactly one of --model DIR or --url URL');
  if (args.out == null) throw new UsageError('--out DIR is required');
  args.backend = args.backend ?? 'cpu';
  if (args.backend !== 'cpu' && args.backend !== 'wasm') {
    throw new UsageError(`--backend must be cpu or wasm, got ${JSON.stringify(args.backend)}`);
  }
  return args;
}

function intArg(args, key, fallback, min = 0) {
  if (args[key] == null) return fallback;
  const value = Number(args[key]);
  if (!Number.isInteger(value) || value < min) throw new UsageError(`--${key} must be an integer >= ${min}`);
  return value;
}

// ---- arrays in and out -----------------------------------------------------------------------

const NPY_DTYPES = {
  '<f4': Float32Array, '<f8': Float64Array, '<i4': Int32Array, '<i8': BigInt64Array,
  '|u1': Uint8Array, '<u1': Uint8Array, '|i1': Int8Array, '<i2': Int16Array, '<u2': Uint16Array,
  '|b1': Uint8Array,
};

function readNpy(file) {
  const buf = fs.readFileSync(file);
  if (buf.toString('latin1', 0, 6) !== '\x93NUMPY') throw new Error(`${file} is not a .npy file`);
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = (major === 1 ? 10 : 12);
  const header = buf.toString('latin1', start, start + headerLen);
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? '';
  const shape = shapeText.split(',').map(s => s.trim()).filter(Boolean).map(Number);
  const Ctor = NPY_DTYPES[descr];
  if (!Ctor) throw new Error(`${file}: unsupported .npy dtype ${descr}`);
  if (fortran) throw new Error(`${file}: Fortran-order .npy is not supported; save with np.ascontiguousarray`);
  const offset = start + headerLen;
  const count = shape.reduce((a, b) => a * b, 1);
  const bytes = buf.subarray(offset, offset + count * Ctor.BYTES_PER_ELEMENT);
  const aligned = new Uint8Array(bytes.length);
  aligned.set(bytes);
  const typed = new Ctor(aligned.buffer, 0, count);
  const values = typed instanceof Float32Array ? typed : Float32Array.from(typed, Number);
  return { values, shape };
}

function readInput(file, shapeText) {
  if (file.endsWith('.npy')) return readNpy(file);
  if (shapeText == null) throw new UsageError(`${file}: raw float32 input needs --shape`);
  const shape = shapeText.split(',').map(s => Number(s.trim()));
  if (shape.some(d => !Number.isInteger(d) || d < 0)) throw new UsageError(`bad --shape ${shapeText}`);
  const buf = fs.readFileSync(file);
  const count = shape.reduce((a, b) => a * b, 1);
  if (buf.length !== count * 4) {
    throw new Error(`${file} holds ${buf.length} bytes; shape [${shape}] of float32 needs ${count * 4}`);
  }
  const aligned = new Uint8Array(buf.length);
  aligned.set(buf);
  return { values: new Float32Array(aligned.buffer), shape };
}

function npyBytes(values, shape) {
  const shapeText = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`;
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': ${shapeText}, }`;
  const total = 10 + header.length + 1;
  header += ' '.repeat((64 - (total % 64)) % 64) + '\n';
  const head = Buffer.alloc(10);
  head.write('\x93NUMPY', 0, 'latin1');
  head[6] = 1;
  head[7] = 0;
  head.writeUInt16LE(header.length, 8);
  return Buffer.concat([head, Buffer.from(header, 'latin1'), Buffer.from(values.buffer, values.byteOffset, values.byteLength)]);
}

// ---- backend and model -----------------------------------------------------------------------

// The wasm backend's .wasm binaries: beside this file in the bundle (dist/), else in the
// package's dist folder under node_modules. Under Node a plain file path works.
function wasmFolder() {
  if (fs.existsSync(path.join(HERE, 'tfjs-backend-wasm.wasm'))) return HERE + path.sep;
  const require = createRequire(import.meta.url);
  return path.join(path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/package.json')), 'dist') + path.sep;
}

let wasmReady = false;

async function loadTf(backend) {
  const tf = await import('@tensorflow/tfjs');
  if (backend === 'wasm' && !wasmReady) {
    const wasm = await import('@tensorflow/tfjs-backend-wasm');
    wasm.setWasmPaths(wasmFolder());
    registerMissingKernels(tf, 'wasm');  // Einsum (MultiHeadAttention graph models): web_client/lib/backend.js
    wasmReady = true;
  }
  if (!(await tf.setBackend(backend))) throw new Error(`the ${backend} backend failed to initialise`);
  await tf.ready();
  tf.enableProdMode();
  loadedTf = tf;
  return tf;
}

// model.json's "format" says which kind it is: "layers-model" (tf.loadLayersModel: predicts and
// trains) or "graph-model" (tf.loadGraphModel: a TF graph, inference only).
function modelKind(modelJson, where) {
  if (modelJson?.format === 'graph-model') return 'graph';
  if (modelJson?.format === 'layers-model') return 'layers';
  const topology = modelJson?.modelTopology;
  if (topology?.node) return 'graph';
  if (topology?.model_config || topology?.class_name) return 'layers';
  throw new Error(`${where} is neither a TF.js layers model nor a graph model`);
}

// {model, kind}: the model from DIR (files read here, tf.io.fromMemory) or from a URL (the
// browser's path: TF.js fetches model.json and the shards itself).
async function loadModel(tf, args) {
  if (args.url != null) {
    const response = await fetch(args.url);
    if (!response.ok) throw new Error(`${args.url} answered ${response.status}`);
    const kind = modelKind(await response.json(), args.url);
    const model = kind === 'graph' ? await tf.loadGraphModel(args.url) : await tf.loadLayersModel(args.url);
    return { model, kind };
  }
  const dir = args.model;
  const modelJsonPath = path.join(dir, 'model.json');
  if (!fs.existsSync(modelJsonPath)) throw new Error(`${modelJsonPath} does not exist`);
  const modelJson = JSON.parse(fs.readFileSync(modelJsonPath, 'utf8'));
  if (modelJson.modelTopology == null) throw new Error(`${modelJsonPath} has no modelTopology`);
  const kind = modelKind(modelJson, modelJsonPath);
  const weightSpecs = [];
  const buffers = [];
  for (const group of modelJson.weightsManifest ?? []) {
    weightSpecs.push(...group.weights);
    for (const shard of group.paths) buffers.push(fs.readFileSync(path.join(dir, shard)));
  }
  const joined = Buffer.concat(buffers);
  const weightData = joined.buffer.slice(joined.byteOffset, joined.byteOffset + joined.byteLength);
  const artifacts = {
    modelTopology: modelJson.modelTopology,
    weightSpecs,
    weightData,
    trainingConfig: modelJson.trainingConfig,
    format: modelJson.format,
    generatedBy: modelJson.generatedBy,
    convertedBy: modelJson.convertedBy,
    signature: modelJson.signature,
    userDefinedMetadata: modelJson.userDefinedMetadata,
    modelInitializer: modelJson.modelInitializer,
  };
  const handler = tf.io.fromMemory(artifacts);
  const model = kind === 'graph' ? await tf.loadGraphModel(handler) : await tf.loadLayersModel(handler);
  return { model, kind };
}

// A function running the model on a batch (a tensor, or a list for several inputs) that resolves
// to the list of output tensors. A graph model runs with execute() unless it has control flow
// (a recurrent layer's While loop), which needs executeAsync(); which one is found on the first call.
function makeRunner(model, kind) {
  const asList = out => (Array.isArray(out) ? out : out instanceof Object && !(out.dataId) ? Object.values(out) : [out]);
  if (kind === 'layers') return async batch => asList(model.predict(batch));
  let sync = true;
  return async batch => {
    if (sync) {
      try {
        return asList(model.execute(batch));
      } catch (err) {
        if (!/executeAsync/.test(String(err?.message))) throw err;
        sync = false;
      }
    }
    return asList(await model.executeAsync(batch));
  };
}

function toTensors(tf, arrays) {
  return arrays.map(a => tf.tensor(a.values, a.shape, 'float32'));
}

function sliceRows(tf, tensors, start, size) {
  return tensors.map(t => tf.slice(t, start, Math.min(size, t.shape[0] - start)));
}

function single(list) {
  return list.length === 1 ? list[0] : list;
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

// ---- modes -----------------------------------------------------------------------------------

async function predict(tf, model, args, kind) {
  if (args.input.length === 0) throw new UsageError('predict needs --input');
  if (args.shape.length > 0 && args.shape.length !== args.input.length) {
    throw new UsageError('give one --shape per raw --input (or none when all inputs are .npy)');
  }
  if (args.input.length !== model.inputs.length) {
    throw new Error(`the model has ${model.inputs.length} input(s); got ${args.input.length} --input`);
  }
  const arrays = args.input.map((file, i) => readInput(file, args.shape[i]));
  const rows = arrays[0].shape[0];
  if (arrays.some(a => a.shape[0] !== rows)) throw new Error('all inputs need the same number of samples');
  const batchSize = intArg(args, 'batch-size', 256, 1);
  const repeats = intArg(args, 'latency-repeats', 50, 0);
  const warmup = intArg(args, 'warmup', 5, 0);
  const format = args['output-format'] ?? 'npy';
  if (!['npy', 'bin', 'json'].includes(format)) throw new UsageError('--output-format must be npy, bin or json');

  const inputs = toTensors(tf, arrays);
  const runModel = makeRunner(model, kind);
  const chunks = model.outputs.map(() => []);
  const outShapes = [];
  for (let start = 0; start < rows; start += batchSize) {
    const batch = sliceRows(tf, inputs, start, batchSize);
    const outs = await runModel(single(batch));
    outs.forEach((t, i) => {
      chunks[i].push(t.dataSync().slice());
      outShapes[i] = t.shape.slice(1);
    });
    tf.dispose([...batch, ...outs]);
  }

  const outputs = [];
  chunks.forEach((parts, i) => {
    const total = parts.reduce((n, p) => n + p.length, 0);
    const values = new Float32Array(total);
    let at = 0;
    for (const p of parts) { values.set(p, at); at += p.length; }
    const shape = [rows, ...(outShapes[i] ?? (model.outputs[i].shape ?? [0]).slice(1).map(d => Math.max(d, 0)))];
    const entry = { shape };
    if (format === 'npy') {
      entry.file = `output_${i}.npy`;
      fs.writeFileSync(path.join(args.out, entry.file), npyBytes(values, shape));
    } else if (format === 'bin') {
      entry.file = `output_${i}.bin`;
      fs.writeFileSync(path.join(args.out, entry.file), Buffer.from(values.buffer));
    } else {
      entry.values = Array.from(values);
    }
    outputs.push(entry);
  });

  let latency = { warmup, repeats, median: null, p90: null, mean: null, min: null, max: null };
  if (repeats > 0 && rows > 0) {
    const one = sliceRows(tf, inputs, 0, 1);
    const run = async () => {
      const outs = await runModel(single(one));
      outs.forEach(t => t.dataSync());
      tf.dispose(outs);
    };
    for (let i = 0; i < warmup; i++) await run();
    const times = [];
    for (let i = 0; i < repeats; i++) {
      const t0 = performance.now();
      await run();
      times.push(performance.now() - t0);
    }
    tf.dispose(one);
    times.sort((a, b) => a - b);
    latency = {
      warmup, repeats,
      median: percentile(times, 0.5), p90: percentile(times, 0.9),
      mean: times.reduce((a, b) => a + b, 0) / times.length,
      min: times[0], max: times[times.length - 1],
    };
  }
  tf.dispose(inputs);
  return { outputs, latency_ms: latency };
}

const LOSS_ALIASES = {
  mse: 'meanSquaredError', mae: 'meanAbsoluteError', mape: 'meanAbsolutePercentageError',
  msle: 'meanSquaredLogarithmicError', kld: 'kullbackLeiblerDivergence',
};

function camel(name) {
  return name.replace(/_+(\w)/g, (_, c) => c.toUpperCase());
}

async function fit(tf, model, args, kind) {
  if (kind !== 'layers') {
    throw new Error('this is a TF.js graph model, which runs inference only: fit needs a LayersModel (tfjs-layers)');
  }
  if (args.x.length === 0 || args.y == null) throw new UsageError('fit needs --x and --y');
  if (args.loss == null) throw new UsageError('fit needs --loss');
  if (args.x.length !== model.inputs.length) {
    throw new Error(`the model has ${model.inputs.length} input(s); got ${args.x.length} --x`);
  }
  const xs = args.x.map((file, i) => readInput(file, args['x-shape'][i]));
  const ys = readInput(args.y, args['y-shape'][0]);
  const rows = xs[0].shape[0];
  if (xs.some(a => a.shape[0] !== rows) || ys.shape[0] !== rows) throw new Error('x and y need the same number of samples');
  const steps = intArg(args, 'steps', 10, 0);
  const batchSize = Math.min(intArg(args, 'batch-size', 32, 1), rows);
  const learningRate = args['learning-rate'] == null ? 0.001 : Number(args['learning-rate']);
  if (!(learningRate > 0)) throw new UsageError('--learning-rate must be a positive number');
  const optimizerName = camel((args.optimizer ?? 'adam').toLowerCase());
  const factories = {
    sgd: lr => tf.train.sgd(lr), adam: lr => tf.train.adam(lr), adamax: lr => tf.train.adamax(lr),
    rmsprop: lr => tf.train.rmsprop(lr), adagrad: lr => tf.train.adagrad(lr), adadelta: lr => tf.train.adadelta(lr),
  };
  if (!factories[optimizerName]) throw new UsageError(`unknown optimizer ${args.optimizer}; use one of ${Object.keys(factories).join(', ')}`);
  const loss = LOSS_ALIASES[args.loss] ?? camel(args.loss);

  model.compile({ optimizer: factories[optimizerName](learningRate), loss });
  const x = toTensors(tf, xs);
  const [y] = toTensors(tf, [ys]);
  const losses = [];
  const t0 = performance.now();
  let start = 0;
  for (let step = 0; step < steps; step++) {
    if (start + batchSize > rows) start = 0;
    const xb = sliceRows(tf, x, start, batchSize);
    const [yb] = sliceRows(tf, [y], start, batchSize);
    const value = await model.trainOnBatch(single(xb), yb);
    losses.push(Array.isArray(value) ? value[0] : value);
    tf.dispose([...xb, yb]);
    start += batchSize;
  }
  const fitMs = performance.now() - t0;
  tf.dispose([...x, y]);
  return { losses, steps, batch_size: batchSize, optimizer: optimizerName, loss, learning_rate: learningRate, fit_ms: fitMs };
}

// One request: load the model on its backend, predict or fit, free everything it made.
// Requests run one at a time, so one engine scope per request frees every tensor it made, even
// when it fails half-way; variables (weights, optimizer state) outlive scopes, so every variable
// the request created is disposed too (model.dispose() alone leaves a nested model's weights).
async function runRequest(args) {
  fs.mkdirSync(args.out, { recursive: true });
  const tf = await loadTf(args.backend);
  const variables = () => tf.engine().state.registeredVariables;
  const existing = new Set(Object.keys(variables()));
  tf.engine().startScope();
  let model = null;
  try {
    const t0 = performance.now();
    const loaded = await loadModel(tf, args);
    model = loaded.model;
    const loadMs = performance.now() - t0;
    const result = args.mode === 'predict' ? await predict(tf, model, args, loaded.kind) : await fit(tf, model, args, loaded.kind);
    const report = { mode: args.mode, kind: loaded.kind, backend: tf.getBackend(), tfjs_version: tf.version.tfjs, load_ms: loadMs, ...result };
    if (report.backend === 'wasm') {
      report.wasm = {
        simd: await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT'),
        threads: await tf.env().getAsync('WASM_HAS_MULTITHREAD_SUPPORT'),
      };
    }
    return report;
  } finally {
    model?.optimizer?.dispose?.();
    model?.dispose();
    for (const [name, variable] of Object.entries(variables())) if (!existing.has(name)) variable.dispose();
    tf.engine().endScope();
  }
}

function errorMessage(err) {
  return (err?.message ?? String(err)).replace(/\s+/g, ' ').trim();
}

// Who is answering, and how many tensors are alive (a leak across requests would show here).
async function hello() {
  const tf = await import('@tensorflow/tfjs');
  return {
    tfjs_version: tf.version.tfjs, node: process.version, pid: process.pid,
    bundled: fs.existsSync(path.join(HERE, 'tfjs-backend-wasm.wasm')), num_tensors: tf.memory().numTensors,
  };
}

let loadedTf = null;  // the TF.js module, once a request has loaded it

function liveTensors() {
  return loadedTf ? loadedTf.memory().numTensors : 0;
}

async function serve() {
  // stdout carries the answers and nothing else: TF.js' own messages go to stderr
  for (const name of ['log', 'info', 'warn', 'debug']) console[name] = (...a) => console.error(...a);
  const reply = message => new Promise(resolve => process.stdout.write(JSON.stringify(message) + '\n', resolve));
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let id = null;
    const before = liveTensors();
    try {
      const request = JSON.parse(line);
      id = request.id ?? null;
      const report = request.mode === 'hello' ? await hello() : await runRequest(checkArgs({ ...request.args, mode: request.mode }));
      await reply({ id, ok: true, report });
    } catch (err) {
      // A kernel that fails half-way can keep tensors beyond the request's scope (TF.js 4.22's
      // wasm TensorList does): then ask the caller to recycle this process, so no check ever
      // runs beside another's leftovers.
      const recycle = liveTensors() > before;
      await reply({ id, ok: false, error: errorMessage(err), usage: err instanceof UsageError || err instanceof SyntaxError, recycle });
    }
  }
}

async function main() {
  if (process.argv[2] === 'serve') return serve();
  const args = parseArgs(process.argv.slice(2));
  const report = await runRequest(args);
  fs.writeFileSync(path.join(args.out, 'report.json'), JSON.stringify(report));
}

main().catch(err => {
  process.stderr.write(`error: ${errorMessage(err)}\n`);
  process.exit(err instanceof UsageError ? 2 : 1);
});
