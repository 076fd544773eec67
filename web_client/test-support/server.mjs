// A real store and a real `pollinate serve` on 127.0.0.1 for the library's tests.
//
// prepareStore() trains two digits versions with the `pollinate` CLI of the repository's
// .venv (about 35 s on 2 cores: TensorFlow start-up and the exporter's checks dominate; once
// per run where POLLINATE_TEST_CACHE is set) and points `stable` at v1. startServer() runs `pollinate serve --port 0 --json` and waits
// until /healthz answers.

import { spawn, execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const PYTHON = process.env.POLLINATE_PYTHON ?? path.join(REPO, '.venv/bin/python');

function cliEnv() {
  const env = { ...process.env, TF_CPP_MIN_LOG_LEVEL: '3' };
  for (const key of ['POLLINATE_HOME', 'POLLINATE_ADMIN_TOKEN', 'POLLINATE_SERVER', 'POLLINATE_WEB_CLIENT', 'POLLINATE_CORS_ORIGINS']) delete env[key];
  return env;
}

/** Runs `pollinate ARGS --home HOME --json` and returns its JSON. */
export async function pollinate(home, ...args) {
  try {
    const { stdout } = await run(PYTHON, ['-m', 'pollinate', ...args, '--home', home, '--json'],
      { cwd: REPO, env: cliEnv(), maxBuffer: 64 * 1024 * 1024, timeout: 300_000 });
    return JSON.parse(stdout);
  } catch (error) {
    throw new Error(`pollinate ${args.join(' ')} failed: ${error.stderr || error.message}`);
  }
}

/**
 * A temporary store with digits v1 (seed 0) and v2 (seed 1), stable → v1. Where
 * POLLINATE_TEST_CACHE names a folder (scripts/test.sh makes one per run, and removes it), the
 * two versions are trained once per run (by the first caller, or by the Python tests before:
 * tests/conftest.py's stored_once, the same template name and steps) and copied: 35 s sooner.
 * A store is a folder (SQLite and files, no absolute paths), copied whole once nothing writes
 * it; the template appears by rename, so a caller either finds it whole or trains its own.
 */
export async function prepareStore() {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'pollinate-web-'));
  const cache = process.env.POLLINATE_TEST_CACHE;
  const template = cache ? path.join(cache, 'digits-v1-v2') : null;
  if (template && fs.existsSync(template)) {
    fs.cpSync(template, home, { recursive: true });
  } else {
    await pollinate(home, 'train', '--dataset', 'digits', '--epochs', '3', '--seed', '0');
    await pollinate(home, 'train', '--dataset', 'digits', '--epochs', '3', '--seed', '1');
    if (template) {
      const building = fs.mkdtempSync(path.join(cache, 'building-'));
      fs.cpSync(home, building, { recursive: true });
      try {
        fs.renameSync(building, template);
      } catch {
        fs.rmSync(building, { recursive: true, force: true });  // another caller's copy got there first
      }
    }
  }
  await pollinate(home, 'models', 'promote', 'digits', '1', '--channel', 'stable');
  return home;
}

/** `pollinate serve` on a free port; resolves to {url, stop()}. */
export async function startServer(home) {
  const child = spawn(PYTHON, ['-m', 'pollinate', 'serve', '--home', home, '--port', '0', '--json'],
    { cwd: REPO, env: cliEnv(), stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let stderr = '';
  child.stderr.on('data', chunk => { stderr = (stderr + chunk).slice(-20_000); });
  const exited = new Promise(resolve => child.once('exit', resolve));
  const firstLine = await Promise.race([
    new Promise(resolve => readline.createInterface({ input: child.stdout }).once('line', resolve)),
    exited.then(code => { throw new Error(`pollinate serve exited (${code}):\n${stderr}`); }),
  ]);
  const { url } = JSON.parse(firstLine);
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    try { process.kill(-child.pid, 'SIGTERM'); } catch { /* gone */ }
    const timer = setTimeout(() => { try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ } }, 10_000);
    await exited;
    clearTimeout(timer);
  };
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      if ((await fetch(`${url}/healthz`)).ok) break;
    } catch { /* not up yet */ }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`pollinate serve did not come up:\n${stderr}`);
    }
    await new Promise(r => setTimeout(r, 50));
  }
  return { url, stop, get stderr() { return stderr; } };
}

/** The ten test-split digits the demo page offers (raw intensities 0..16, with labels). */
export function sampleDigits() {
  const file = path.join(REPO, 'web_client/app/samples.json');
  return JSON.parse(fs.readFileSync(file, 'utf8')).samples;
}
