// tools/fleet.mjs: simulated browsers on the library's contribute(), against a real
// `pollinate serve` whose rounds are opened in the real store the way a gateway opens them
// (registry/edge.py's EdgeStore.open_task). One browser is late (posts past the deadline:
// 409 stale), one drops (trains, never posts), one keeps its update until the next round
// (409 stale); the server's /status and /metrics must count what the fleet says happened.

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';

import { drawBehaviour, keepExamples, parseArgs, parseFleetData, UsageError } from '../tools/fleet-input.mjs';
import { prepareStore, PYTHON, REPO, sampleDigits, startServer } from '../test-support/server.mjs';

const FLEET = path.join(REPO, 'web_client/tools/fleet.mjs');
const samples = sampleDigits();

// The gateway's side, played in Python on the same store: `open` the task of a round whose base
// is v1's Keras weights (keras) or another task's base (a task id); `close` one.
const EDGE = `
import json, sys, time
import numpy as np
from registry import Store
from registry.edge import EdgeStore, weights_spec
op, home, *args = sys.argv[1:]
edge = EdgeStore(Store(home))
if op == "open":
    federation, rnd, source, seconds = args[0], int(args[1]), args[2], float(args[3])
    if source == "keras":
        import shutil, tempfile
        from pathlib import Path
        import keras
        folder = Path(tempfile.mkdtemp())
        shutil.copy(Store(home).artifact_path("digits", 1, "keras", "model.keras"), folder / "model.keras")
        model = keras.saving.load_model(folder / "model.keras")
        arrays = model.get_weights()
        spec = weights_spec(arrays, [v.path for v in model.weights])
        base = np.concatenate([a.ravel() for a in arrays])
    else:
        spec, base = edge.get_task(source).weights, edge.base_weights(source)
    task = edge.open_task("digits", federation=federation, round=rnd, gateway="gw", base_version=1,
        config={"epochs": 1, "batch_size": 4, "learning_rate": 0.001}, weights=spec, base=base,
        deadline=time.time() + seconds, min_updates=2, norm_bound=float(np.linalg.norm(base)))
    print(json.dumps({"task_id": task.task_id, "size": task.size}))
elif op == "close":
    edge.close_task(args[0])
    print(json.dumps({"closed": args[0]}))
`;
const edge = async (...args) => JSON.parse((await promisify(execFile)(PYTHON, ['-c', EDGE, ...args],
  { cwd: REPO, env: { ...process.env, TF_CPP_MIN_LOG_LEVEL: '3', PYTHONPATH: REPO } })).stdout);

/** Runs the fleet CLI; `onEvent(event)` sees each stdout event as it comes. {code, events, stderr}. */
function fleet(args, onEvent = () => {}) {
  const child = spawn(process.execPath, [FLEET, ...args], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
  const events = [];
  let stderr = '';
  child.stderr.on('data', chunk => { stderr += chunk; });
  readline.createInterface({ input: child.stdout }).on('line', line => {
    const event = JSON.parse(line);  // every stdout line is one JSON event
    events.push(event);
    onEvent(event);
  });
  const done = new Promise(resolve => child.once('close', code => resolve({ code, events, stderr })));
  return Object.assign(done, { child });
}

const pixels = sample => sample.pixels.map(v => v / 16);  // the model's input: the manifest's scale 1/16

const scratch = [];  // temporary folders, removed when the file's tests end
after(() => { for (const folder of scratch) fs.rmSync(folder, { recursive: true, force: true }); });

function dataFile(devices) {
  const folder = fs.mkdtempSync(path.join(os.tmpdir(), 'pollinate-fleet-'));
  scratch.push(folder);
  const file = path.join(folder, 'fleet.json');
  fs.writeFileSync(file, JSON.stringify({ input_shape: [8, 8, 1], devices }));
  return file;
}

/** Device `id` with `n` of the demo's test digits (from `from`), as the Python side writes them. */
const device = (id, from, n, behaviour) => ({
  id, behaviour, x: samples.slice(from, from + n).map(pixels), y: samples.slice(from, from + n).map(s => Number(s.label)),
});

const counter = (text, name, labels) => {
  const line = text.split('\n').find(l => l.startsWith(`${name}{`) && labels.every(label => l.includes(label)));
  return line ? Number(line.split(' ').pop()) : 0;
};

describe('arguments and data', () => {
  test('each bad argument or data file is one error line and exit 2, before any network', async () => {
    const good = dataFile([device('b0', 0, 2)]);
    const bad = dataFile([{ id: 'b0', x: [[1, 2, 3]], y: [1] }]);
    const cases = [
      [['--model', 'digits', '--data', good], /--server is required/],
      [['--server', 'ftp://x', '--model', 'digits', '--data', good], /http\(s\) URL/],
      [['--server', 'http://127.0.0.1:9', '--model', 'digits', '--data', good, '--late', '0.7', '--drop', '0.5'], /at most 1/],
      [['--server', 'http://127.0.0.1:9', '--model', 'digits', '--data', good, '--rounds', '0'], /--rounds must be at least 1/],
      [['--server', 'http://127.0.0.1:9', '--model', 'digits', '--data', '/nonexistent.json'], /no such file/],
      [['--server', 'http://127.0.0.1:9', '--model', 'digits', '--data', bad], /x\[0\] \(b0\) must be a flat list of 64 numbers/],
      [['--server', 'http://127.0.0.1:9', '--model', 'digits', '--data', good, '--wat'], /unknown argument/],
    ];
    for (const [args, message] of cases) {
      const { code, events, stderr } = await fleet(args);
      assert.equal(code, 2, `${args.join(' ')}: ${stderr}`);
      assert.deepEqual(events, []);
      assert.match(stderr, /^error: /);
      assert.equal(stderr.trim().split('\n').length, 1, stderr);
      assert.match(stderr, message);
    }
  });

  test('data checks name the device and the example', () => {
    assert.throws(() => parseFleetData('{"input_shape": [2], "devices": [{"id": "a", "x": [[0, 1]], "y": [0, 1]}]}', 'f.json'),
      e => e instanceof UsageError && /devices\[0\] \(a\) has 1 inputs in "x" but 2 labels/.test(e.message));
    assert.throws(() => parseFleetData('{"input_shape": [2], "devices": [{"id": "a", "x": [[0, null]], "y": [0]}]}'),
      e => e instanceof UsageError && /x\[0\]\[1\] \(a\) must be a finite number/.test(e.message));
    assert.throws(() => parseFleetData('{"input_shape": [2], "devices": [{"id": "a", "x": [[0, 1]], "y": [0], "behaviour": "slow"}]}'),
      e => /behaviour \(a\) must be one of normal, late, drop, stale/.test(e.message));
    assert.throws(() => parseFleetData('{"input_shape": [2], "devices": [{"id": "a", "x": [[0, 1]], "y": [0]}, {"id": "a", "x": [[0, 1]], "y": [0]}]}'),
      e => /"a" appears twice/.test(e.message));
    const ok = parseFleetData('{"input_shape": [2], "devices": [{"id": "a", "x": [[0, 0.5]], "y": ["3"]}]}');
    assert.deepEqual(Array.from(ok.devices[0].x[0]), [0, 0.5]);
  });

  test('behaviours are drawn per (seed, device, round): reproducible, in the asked proportions', () => {
    const options = parseArgs(['--server', 'http://h:1', '--model', 'digits', '--data', 'f', '--late', '0.2', '--drop', '0.1', '--stale', '0.3', '--seed', '7']);
    const draws = [];
    for (let d = 0; d < 100; d++) for (let r = 1; r <= 20; r++) draws.push(drawBehaviour(options, `b${d}`, r));
    const share = name => draws.filter(b => b === name).length / draws.length;
    assert.ok(Math.abs(share('late') - 0.2) < 0.03 && Math.abs(share('drop') - 0.1) < 0.03 && Math.abs(share('stale') - 0.3) < 0.03, JSON.stringify({ late: share('late'), drop: share('drop'), stale: share('stale') }));
    assert.equal(drawBehaviour(options, 'b3', 2), drawBehaviour({ ...options }, 'b3', 2));
    assert.notDeepEqual([1, 2, 3, 4, 5, 6].map(r => drawBehaviour(options, 'b1', r)), [1, 2, 3, 4, 5, 6].map(r => drawBehaviour({ ...options, seed: 8 }, 'b1', r)));
    assert.equal(drawBehaviour(options, 'b1', 1, 'drop'), 'drop', 'a behaviour the data file forces wins');
  });

  test('--max-examples keeps a seeded subset of each device\'s examples, labels with their inputs', () => {
    const full = { id: 'b0', x: Array.from({ length: 10 }, (_, i) => Float32Array.of(i)), y: Array.from({ length: 10 }, (_, i) => i) };
    const kept = keepExamples(full, 4, 1);
    assert.equal(kept.x.length, 4);
    kept.x.forEach((x, i) => assert.equal(x[0], kept.y[i]));
    assert.deepEqual(keepExamples(full, 4, 1).y, kept.y);
    assert.notDeepEqual(keepExamples(full, 4, 2).y, kept.y);
    assert.equal(keepExamples(full, 20, 1), full);
    assert.equal(parseArgs(['--server', 'http://h:1', '--model', 'm', '--data', 'f', '--max-examples', '8']).maxExamples, 8);
  });
});

describe('a fleet against a real server', () => {
  let home;
  let server;
  let seed;

  before(async () => {
    home = await prepareStore();  // digits v1 and v2 (copied, where another file of the run trained them)
    scratch.push(home);
    server = await startServer(home);
    // v1's Keras weights in get_weights() order, once (Keras takes seconds to import); a task
    // already past its deadline, whose base the rounds below start from
    seed = await edge('open', home, 'fleet-seed', '1', 'keras', '0');
  });

  after(async () => {
    await server?.stop();
  });

  test('three browsers, one late and one dropping: 1 accepted, 1 stale, 1 never posted, as the server counts', async () => {
    const data = dataFile([device('b0', 0, 3, 'normal'), device('b1', 3, 3, 'late'), device('b2', 6, 3, 'drop')]);
    // once the browsers are loaded and polling (204: no round yet), the gateway's side opens
    // round 1 with a deadline a few seconds out: they train in turn, b1 posts after it
    let opened = null;
    const { code, events, stderr } = await fleet(['--server', server.url, '--model', 'digits', '--data', data, '--rounds', '1', '--poll-ms', '100', '--max-seconds', '90'],
      event => { if (event.event === 'ready') opened = edge('open', home, 'fleet-a', '1', seed.task_id, '6'); });
    const task = await opened;
    assert.equal(code, 0, stderr);

    const updates = events.filter(e => e.event === 'update');
    const by = Object.fromEntries(updates.map(e => [e.device, e]));
    assert.equal(updates.length, 3, JSON.stringify(updates));
    assert.deepEqual(Object.fromEntries(updates.map(e => [e.device, [e.behaviour, e.status]])),
      { b0: ['normal', 'accepted'], b1: ['late', 'stale'], b2: ['drop', 'dropped'] });
    assert.match(by.b1.detail, /deadline/);
    assert.ok(by.b1.held_seconds > 0);
    for (const e of updates) {
      assert.equal(e.round, 1);
      assert.equal(e.task_id, task.task_id);
      assert.equal(e.examples, 3);
      assert.equal(e.backend, 'cpu');
      assert.equal(e.kind, 'browser');
      assert.ok(e.train_seconds > 0 && e.train_seconds < 30, `train_seconds ${e.train_seconds}`);
      assert.ok(Number.isFinite(e.loss));
      assert.match(e.device_id, /\S/);
      // the first update of each browser: its model files (load), the task and the base weights
      assert.ok(e.bytes_down > 2 * task.size * 4, `${e.device} bytes_down ${e.bytes_down}`);
    }
    assert.equal(by.b0.bytes_up, task.size * 4);
    assert.equal(by.b1.bytes_up, task.size * 4);
    assert.equal(by.b2.bytes_up, 0);
    assert.equal(new Set(updates.map(e => e.device_id)).size, 3, 'each browser enrolled on its own');
    assert.deepEqual(events.filter(e => e.event === 'held').map(e => [e.device, e.behaviour]), [['b1', 'late']]);

    const { summary } = events.at(-1);
    assert.equal(events.at(-1).event, 'done');
    assert.deepEqual(summary.statuses, { accepted: 1, stale: 1, dropped: 1 });
    assert.deepEqual(summary.behaviours, { normal: 1, late: 1, drop: 1 });
    assert.equal(summary.stopped, 'rounds');
    assert.deepEqual(summary.rounds, [1]);
    assert.equal(summary.bytes_up, 2 * task.size * 4);
    assert.equal(summary.bytes_down, updates.reduce((n, e) => n + e.bytes_down, 0));
    assert.equal(summary.train_seconds.count, 3);
    // b1 and b2 are offered their task again while it is open: not trained twice, no error
    assert.equal(summary.errors, 0, stderr);
    assert.deepEqual(events.filter(e => e.event === 'round').map(e => [e.round, e.task_id]), [[1, task.task_id]]);
    assert.match(stderr, /b1 round 1: stale \[late\]/);

    // the server saw one update and one stale post, nothing from b2
    const status = await (await fetch(`${server.url}/v1/federations/digits/status`)).json();
    assert.equal(status.round, 1);
    assert.equal(status.accepted, 1);
    assert.deepEqual(status.refused, { stale: 1 });
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    assert.equal(counter(metrics, 'pollinate_edge_updates_total', ['model="digits"']), 1);
    assert.equal(counter(metrics, 'pollinate_edge_refusals_total', ['model="digits"', 'reason="stale"']), 1);
    assert.equal(counter(metrics, 'pollinate_edge_enrolments_total', ['model="digits"', 'kind="browser"']), 3);
    console.log(`fleet: train_seconds ${JSON.stringify(summary.train_seconds)}, bytes up ${summary.bytes_up}, down ${summary.bytes_down}`);
  });

  test('a stale browser keeps each round\'s update and posts it once the next round opens (or its round closes)', async () => {
    const data = dataFile([device('s0', 0, 2, 'normal'), device('s1', 2, 2, 'stale')]);
    let first = null;  // a promise: the fleet's events may come before Python's answer
    let second = null;
    const steps = [];
    const seen = new Set();
    const run = fleet(['--server', server.url, '--model', 'digits', '--data', data, '--rounds', '2', '--poll-ms', '100', '--max-seconds', '90',
      '--kind', 'simulated'], event => {
      if (event.event === 'update' || event.event === 'held') seen.add(`${event.device}:${event.round}:${event.event}`);
      // the gateway moves on once round 1 has s0's update and s1 kept its own; closes round 2 likewise
      if (seen.has('s0:1:update') && seen.has('s1:1:held') && !steps.includes('open 2')) {
        steps.push('open 2');
        second = first.then(t => edge('open', home, 'fleet-b', '2', t.task_id, '60'));
      }
      if (seen.has('s0:2:update') && seen.has('s1:2:held') && !steps.includes('close 2')) {
        steps.push('close 2');
        second.then(t => edge('close', home, t.task_id));
      }
    });
    first = edge('open', home, 'fleet-b', '1', seed.task_id, '60');
    const { code, events, stderr } = await run;
    first = await first;
    assert.equal(code, 0, stderr);
    assert.deepEqual(steps, ['open 2', 'close 2']);
    const updates = events.filter(e => e.event === 'update');
    assert.deepEqual(updates.map(e => [e.device, e.round, e.status]).sort(),
      [['s0', 1, 'accepted'], ['s0', 2, 'accepted'], ['s1', 1, 'stale'], ['s1', 2, 'stale']]);
    const s1 = updates.filter(e => e.device === 's1').sort((a, b) => a.round - b.round);
    assert.match(s1[0].detail, /closed/);
    assert.equal(s1[0].task_id, first.task_id);
    assert.ok(s1.every(e => e.bytes_up === first.size * 4 && e.kind === 'simulated'));
    // round 2's download holds no model files (cached since round 1): the task and its base weights
    const s0 = updates.filter(e => e.device === 's0').sort((a, b) => a.round - b.round);
    assert.ok(s0[1].bytes_down < s0[0].bytes_down, JSON.stringify(s0.map(e => e.bytes_down)));
    const { summary } = events.at(-1);
    assert.deepEqual(summary.statuses, { accepted: 2, stale: 2 });
    assert.equal(summary.errors, 0, stderr);
    assert.deepEqual(summary.rounds, [1, 2]);
    const status = await (await fetch(`${server.url}/v1/federations/digits/status`)).json();
    assert.equal(status.federation, 'fleet-b');
    assert.equal(status.round, 2);
    assert.equal(status.accepted, 1);
    assert.equal(status.refused.stale, 1, 'round 2 counts its own stale post');
  });

  test('SIGTERM stops the fleet: an update kept for a task that still takes it is reported unsent, the summary printed', async () => {
    const data = dataFile([device('t0', 0, 2, 'late')]);
    const statusNow = async () => (await fetch(`${server.url}/v1/federations/digits/status`)).json();
    const before = await statusNow();
    let child = null;
    const run = fleet(['--server', server.url, '--model', 'digits', '--data', data, '--rounds', '5', '--poll-ms', '100'], event => {
      if (event.event === 'held') child.kill('SIGTERM');
    });
    child = run.child;
    const task = await edge('open', home, 'fleet-c', '1', seed.task_id, '120');
    const { code, events, stderr } = await run;
    assert.equal(code, 0, stderr);
    const updates = events.filter(e => e.event === 'update');
    assert.deepEqual(updates.map(e => [e.device, e.task_id, e.status, e.bytes_up]), [['t0', task.task_id, 'unsent', 0]]);
    assert.equal(events.at(-1).summary.stopped, 'signal');
    assert.deepEqual(events.at(-1).summary.statuses, { unsent: 1 });
    const status = await statusNow();
    assert.equal(status.federation, 'fleet-c');
    assert.equal(status.accepted, 0);
    // a new federation counts only its own refusals: none, since nothing was posted
    assert.deepEqual(status.refused_total, {}, 'nothing was posted');
    assert.deepEqual(status.refused_unattributed, before.refused_unattributed, 'nothing was posted');
  });

  test('a model the server does not have is exit 2; a server that does not answer is exit 3', async () => {
    const data = dataFile([device('b0', 0, 1)]);
    const missing = await fleet(['--server', server.url, '--model', 'nosuchmodel', '--data', data]);
    assert.equal(missing.code, 2, missing.stderr);
    assert.match(missing.stderr, /^error: cannot load the model: .*404/m);
    const closed = await fleet(['--server', 'http://127.0.0.1:9', '--model', 'digits', '--data', data]);
    assert.equal(closed.code, 3, closed.stderr);
    assert.match(closed.stderr, /^error: http:\/\/127\.0\.0\.1:9 did not answer/m);
  });
});
