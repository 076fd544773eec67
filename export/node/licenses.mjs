// THIRD_PARTY_LICENSES.txt for what we ship built from npm packages (the runner bundle here,
// the page's vendored TF.js in web_client/): every runtime package in the lock file (dev
// dependencies, which build but never ship, are left out), with its version, its declared
// licence and the licence text it ships. Packages that ship no text (TF.js declares
// Apache-2.0 in package.json and the @license header of its bundles) get the Apache-2.0 pointer.
import fs from 'node:fs';
import path from 'node:path';

const TEXT_NAMES = /^(licen[cs]e|copying|notice)(\.|-|$)/i;

export function writeLicenses(lockFile, nodeModules, outFile, { only } = {}) {
  const lock = JSON.parse(fs.readFileSync(lockFile, 'utf8'));
  const entries = [];
  for (const [key, info] of Object.entries(lock.packages ?? {})) {
    if (!key.startsWith('node_modules/') || info.dev || info.optional && !fs.existsSync(path.join(path.dirname(lockFile), key))) continue;
    const name = key.slice(key.lastIndexOf('node_modules/') + 'node_modules/'.length);
    if (name.startsWith('@types/') || (only && !only(name))) continue;
    const folder = path.join(path.dirname(lockFile), key);
    let texts = [];
    if (fs.existsSync(folder)) {
      texts = fs.readdirSync(folder).filter(f => TEXT_NAMES.test(f)).sort()
        .map(f => fs.readFileSync(path.join(folder, f), 'utf8').trim());
    }
    entries.push({ name, version: info.version, license: info.license ?? 'UNKNOWN', texts });
  }
  entries.sort((a, b) => a.name.localeCompare(b.name) || a.version.localeCompare(b.version));
  const parts = [
    'Third-party software shipped with Pollinate, built from npm packages pinned by package-lock.json.',
    `Packages: ${entries.length}. Each entry: name, version, declared licence, and the licence text the package ships.`,
    '',
  ];
  for (const e of entries) {
    parts.push('='.repeat(78), `${e.name} ${e.version}  (${e.license})`, '-'.repeat(78));
    if (e.texts.length) parts.push(...e.texts);
    else if (e.license === 'Apache-2.0') parts.push('Licensed under the Apache License, Version 2.0: http://www.apache.org/licenses/LICENSE-2.0 (see the @license header of the bundled code).');
    else parts.push(`No licence text in the package; declared licence: ${e.license}.`);
    parts.push('');
  }
  fs.writeFileSync(outFile, parts.join('\n'));
  return entries;
}
