// Which TF.js backend runs the model: WebGL where the browser has a GPU context, else
// WebAssembly, else plain JavaScript (cpu). Each candidate must initialise and run one op
// before it is chosen, so a half-working backend is skipped rather than failing later; a
// WebGL that a software rasteriser draws (no GPU) counts as unavailable.

import { PollinateError } from './errors.js';

export const DEFAULT_BACKENDS = Object.freeze(['webgl', 'wasm', 'cpu']);

// Renderers that draw WebGL on the CPU (no GPU, or GPU blocked: VMs, headless browsers).
// TF.js on them is several times slower than wasm (benchmarks/results/browser.md).
const SOFTWARE_RENDERER = /swiftshader|llvmpipe|softpipe|software|basic render/i;

/** The WebGL renderer's name when it is a software rasteriser, else null (also where there is no DOM). */
export function softwareWebglRenderer() {
  const canvas = globalThis.OffscreenCanvas ? new OffscreenCanvas(1, 1) : globalThis.document?.createElement('canvas');
  const gl = canvas?.getContext?.('webgl2') ?? canvas?.getContext?.('webgl');
  if (!gl) return null;
  const info = gl.getExtension('WEBGL_debug_renderer_info');
  const renderer = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER) ?? '');
  gl.getExtension('WEBGL_lose_context')?.loseContext();
  return SOFTWARE_RENDERER.test(renderer) ? renderer : null;
}

let wasmModulePromise = null;

/** Imports @tensorflow/tfjs-backend-wasm once (a bare specifier: Node resolves it, the page maps it). */
function importWasmOnce(loadWasm, wasmPaths) {
  wasmModulePromise ??= (async () => {
    const mod = await loadWasm();
    const wasm = mod?.setWasmPaths ? mod : mod?.default ?? mod;
    if (wasmPaths && typeof wasm?.setWasmPaths === 'function') wasm.setWasmPaths(wasmPaths);
    return wasm;
  })();
  return wasmModulePromise;
}

async function works(tf) {
  const value = tf.tidy(() => tf.add(tf.scalar(1), tf.scalar(2)).dataSync()[0]);
  return value === 3;
}

/**
 * Switches `tf` to the first backend in `backends` that initialises and computes. WebGL
 * drawn in software is passed over while another candidate follows it (name webgl alone to
 * use it anyway).
 * @returns {Promise<{name: string, skipped: {name: string, reason: string}[]}>}
 */
export async function chooseBackend(tf, { backends = DEFAULT_BACKENDS, loadWasm, wasmPaths } = {}) {
  const skipped = [];
  for (const [position, name] of backends.entries()) {
    try {
      if (name === 'webgl' && position < backends.length - 1 && tf.findBackendFactory?.('webgl')) {
        const software = softwareWebglRenderer();
        if (software) throw new Error(`software rendering (${software}), slower than the next choice`);
      }
      if (name === 'wasm' && !tf.findBackendFactory?.('wasm')) {
        if (!loadWasm) throw new Error('no loader for @tensorflow/tfjs-backend-wasm');
        await importWasmOnce(loadWasm, wasmPaths);
      }
      if (!tf.findBackendFactory?.(name) && !tf.engine().registryFactory?.[name]) {
        throw new Error('not registered in this TF.js build');
      }
      const ok = await tf.setBackend(name);
      if (!ok) throw new Error('failed to initialise');
      await tf.ready();
      if (!(await works(tf))) throw new Error('computed a wrong result');
      return { name: tf.getBackend(), skipped };
    } catch (error) {
      skipped.push({ name, reason: error?.message ?? String(error) });
    }
  }
  throw new PollinateError('no-backend', `no TF.js backend works here (tried ${skipped.map(s => `${s.name}: ${s.reason}`).join('; ')})`, { skipped });
}

// ---- kernels a backend lacks -----------------------------------------------------------------
//
// tfjs-backend-wasm 4.22 has no `Einsum` kernel, which Keras' MultiHeadAttention (and
// EinsumDense) compile to in a graph model: registerMissingKernels(tf, 'wasm') adds one that
// computes a two-operand einsum as transpose → reshape → batched matMul → reshape → transpose,
// with the shapes known at run time. The Node runner (export/node/run_tfjs.mjs) imports this too,
// so what `pollinate export` verifies on wasm is what a browser runs.

const LETTERS = /^[A-Za-z]*$/;

function parseEquation(equation, count) {
  const [lhs, out] = String(equation).replace(/\s+/g, '').split('->');
  const operands = (lhs ?? '').split(',');
  if (out == null || operands.length !== count || ![...operands, out].every(s => LETTERS.test(s))) {
    throw new Error(`einsum "${equation}": only explicit two-operand equations without "..." are supported here`);
  }
  for (const s of [...operands, out]) {
    if (new Set(s).size !== s.length) throw new Error(`einsum "${equation}": repeated indices in one operand are not supported here`);
  }
  return { operands, out };
}

/** einsum(equation, a, b) from transpose/reshape/matMul/sum: exact up to float summation order. */
export function einsumTwo(tf, equation, a, b) {
  const { operands: [ia0, ib0], out } = parseEquation(equation, 2);
  return tf.tidy(() => {
    let ia = ia0;
    let ib = ib0;
    let x = a;
    let y = b;
    // an index in one operand only and not in the output is summed out first
    const lonely = (own, other) => [...own].filter(c => !other.includes(c) && !out.includes(c));
    const sumOut = (t, idx, drop) => {
      if (drop.length === 0) return [t, idx];
      return [tf.sum(t, drop.map(c => idx.indexOf(c))), [...idx].filter(c => !drop.includes(c)).join('')];
    };
    [x, ia] = sumOut(x, ia, lonely(ia, ib));
    [y, ib] = sumOut(y, ib, lonely(ib, ia));
    const size = {};
    [...ia].forEach((c, i) => { size[c] = x.shape[i]; });
    [...ib].forEach((c, i) => { size[c] = y.shape[i]; });
    const batch = [...out].filter(c => ia.includes(c) && ib.includes(c));
    const left = [...out].filter(c => ia.includes(c) && !ib.includes(c));
    const right = [...out].filter(c => ib.includes(c) && !ia.includes(c));
    const contract = [...ia].filter(c => ib.includes(c) && !out.includes(c));
    if ([...out].some(c => !ia.includes(c) && !ib.includes(c))) throw new Error(`einsum "${equation}": an output index is in no operand`);
    const prod = cs => cs.reduce((n, c) => n * size[c], 1);
    const xt = tf.reshape(tf.transpose(x, [...batch, ...left, ...contract].map(c => ia.indexOf(c))),
      [prod(batch), prod(left), prod(contract)]);
    const yt = tf.reshape(tf.transpose(y, [...batch, ...contract, ...right].map(c => ib.indexOf(c))),
      [prod(batch), prod(contract), prod(right)]);
    const order = [...batch, ...left, ...right];
    const z = tf.reshape(tf.matMul(xt, yt), order.map(c => size[c]));
    return tf.transpose(z, [...out].map(c => order.indexOf(c)));
  });
}

/** Registers the kernels `backendName` lacks (today: Einsum on wasm); returns their names. */
export function registerMissingKernels(tf, backendName) {
  const added = [];
  if (backendName === 'wasm' && typeof tf.registerKernel === 'function' && !tf.getKernel('Einsum', 'wasm')) {
    tf.registerKernel({
      kernelName: 'Einsum',
      backendName: 'wasm',
      kernelFunc: ({ inputs, attrs }) => {
        const tensors = Array.isArray(inputs) ? inputs : Object.values(inputs);
        if (tensors.length !== 2) throw new Error(`einsum "${attrs.equation}": only two operands are supported on wasm`);
        return einsumTwo(tf, attrs.equation, tensors[0], tensors[1]);
      },
    });
    added.push('Einsum');
  }
  return added;
}
