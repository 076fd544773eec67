// Builds the runner that ships inside the Python package: `npm ci && npm run build`.
//
// dist/run_tfjs.mjs         run_tfjs.mjs and every module it imports, one minified ES module
// dist/*.wasm               @tensorflow/tfjs-backend-wasm's binaries (the bundle loads them from its folder)
// dist/THIRD_PARTY_LICENSES.txt  name, version and licence text of every package the bundle may hold
// dist/run_tfjs.mjs.LEGAL.txt    the @license comments esbuild found in the bundled code
//
// Everything comes from node_modules as package-lock.json pins it, so the same lock file gives
// the same bundle; Python runs it with plain `node`, no node_modules needed.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { writeLicenses } from './licenses.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DIST = path.join(HERE, 'dist');
const WASM = ['tfjs-backend-wasm.wasm', 'tfjs-backend-wasm-simd.wasm', 'tfjs-backend-wasm-threaded-simd.wasm'];

fs.rmSync(DIST, { recursive: true, force: true });
fs.mkdirSync(DIST, { recursive: true });

await esbuild.build({
  entryPoints: [path.join(HERE, 'run_tfjs.mjs')],
  outfile: path.join(DIST, 'run_tfjs.mjs'),
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node18',
  minify: true,
  legalComments: 'linked',
  logLevel: 'warning',
  // CommonJS dependencies call require() for Node built-ins, and the wasm backend's Emscripten
  // glue reads __dirname: give the ES module both (__dirname = dist/, where the .wasm files are).
  banner: {
    js: [
      "import { createRequire as __pollinateRequire } from 'node:module';",
      "import { fileURLToPath as __pollinateToPath } from 'node:url';",
      "import { dirname as __pollinateDirname } from 'node:path';",
      'const require = __pollinateRequire(import.meta.url);',
      'const __filename = __pollinateToPath(import.meta.url);',
      'const __dirname = __pollinateDirname(__filename);',
    ].join(' '),
  },
});

const wasmDist = path.join(HERE, 'node_modules', '@tensorflow', 'tfjs-backend-wasm', 'dist');
for (const file of WASM) fs.copyFileSync(path.join(wasmDist, file), path.join(DIST, file));
writeLicenses(path.join(HERE, 'package-lock.json'), path.join(HERE, 'node_modules'), path.join(DIST, 'THIRD_PARTY_LICENSES.txt'));

const total = fs.readdirSync(DIST).reduce((n, f) => n + fs.statSync(path.join(DIST, f)).size, 0);
console.log(`dist/: ${fs.readdirSync(DIST).join(', ')} (${(total / 1e6).toFixed(2)} MB)`);
