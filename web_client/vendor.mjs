// Copies the TF.js files the demo page needs from node_modules into vendor/tfjs/ (the list is
// vendor.json), with the licences of every runtime package in package-lock.json.
//
//   npm ci              (runs this afterwards: "postinstall")
//   npm run vendor      (again, by hand)
//
// The page's import map, app/app.js (wasmPaths) and sw.js refer to vendor/tfjs/, a path that
// exists both in a checkout (after npm ci) and in the installed Python package (which ships
// this folder as package data and no node_modules). Source-map comments are dropped from the
// copied scripts: the maps are not shipped.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.dirname(fileURLToPath(import.meta.url));
const spec = JSON.parse(fs.readFileSync(path.join(ROOT, 'vendor.json'), 'utf8'));
const nodeModules = path.join(ROOT, 'node_modules');
const out = path.join(ROOT, spec.folder);

const installed = JSON.parse(fs.readFileSync(path.join(nodeModules, '@tensorflow/tfjs/package.json'), 'utf8')).version;
if (installed !== spec.tfjs_version) {
  throw new Error(`node_modules has @tensorflow/tfjs ${installed}; vendor.json wants ${spec.tfjs_version} (run npm ci)`);
}

fs.rmSync(out, { recursive: true, force: true });
fs.mkdirSync(out, { recursive: true });
for (const [name, source] of Object.entries(spec.files)) {
  const from = path.join(nodeModules, source);
  if (name.endsWith('.js')) {
    const text = fs.readFileSync(from, 'utf8').replace(/\n\/\/# sourceMappingURL=\S+\s*$/, '\n');
    fs.writeFileSync(path.join(out, name), text);
  } else {
    fs.copyFileSync(from, path.join(out, name));
  }
}
writeLicenses(path.join(ROOT, 'package-lock.json'), path.join(out, spec.licenses));

const total = fs.readdirSync(out).reduce((n, f) => n + fs.statSync(path.join(out, f)).size, 0);
console.log(`${spec.folder}/: ${fs.readdirSync(out).length} files, ${(total / 1e6).toFixed(2)} MB (TF.js ${installed})`);

// Every runtime package in the lock file (dev dependencies and @types never ship): name,
// version, declared licence and the licence text the package ships. TF.js' own packages ship
// no text: they declare Apache-2.0 (package.json and the @license header of each bundle).
function writeLicenses(lockFile, outFile) {
  const lock = JSON.parse(fs.readFileSync(lockFile, 'utf8'));
  const parts = [
    'Third-party software in this folder, copied from npm packages pinned by web_client/package-lock.json.',
    'Each entry: name, version, declared licence, and the licence text the package ships.',
    '',
  ];
  const entries = Object.entries(lock.packages ?? {})
    .filter(([key, info]) => key.startsWith('node_modules/') && !info.dev && !key.includes('@types/'))
    .map(([key, info]) => ({ key, name: key.slice(key.lastIndexOf('node_modules/') + 13), info }))
    .sort((a, b) => a.name.localeCompare(b.name));
  for (const { key, name, info } of entries) {
    const folder = path.join(path.dirname(lockFile), key);
    const texts = fs.existsSync(folder)
      ? fs.readdirSync(folder).filter(f => /^(licen[cs]e|copying|notice)(\.|-|$)/i.test(f)).sort()
        .map(f => fs.readFileSync(path.join(folder, f), 'utf8').trim())
      : [];
    parts.push('='.repeat(78), `${name} ${info.version}  (${info.license ?? 'UNKNOWN'})`, '-'.repeat(78));
    if (texts.length) parts.push(...texts);
    else if (info.license === 'Apache-2.0') parts.push('Licensed under the Apache License, Version 2.0: http://www.apache.org/licenses/LICENSE-2.0 (see the @license header of the bundled code).');
    else parts.push(`No licence text in the package; declared licence: ${info.license ?? 'UNKNOWN'}.`);
    parts.push('');
  }
  fs.writeFileSync(outFile, parts.join('\n'));
}
