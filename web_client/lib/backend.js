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
