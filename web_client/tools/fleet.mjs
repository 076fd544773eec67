#!/usr/bin/env node
// A fleet of simulated browsers on the web client's real code path: one PollinateClient per
// device of the data file, in this Node process, each contributing to the open federated
// rounds through contribute() with TF.js on the cpu backend (what `pollinate federate simulate
// --edge-browsers N` runs). Some browsers can be late, drop out or post stale updates.
//
//   node web_client/tools/fleet.mjs --server http://127.0.0.1:8000 --model digits \
//        --data fleet.json --rounds 3 --late 0.1 --drop 0.1 --stale 0.1 --seed 1
//
// stdout: one JSON object per line: {"event": "round"|"held"|"update"|"error"|"done", ...};
// an update: {device, round, task_id, status, behaviour, train_seconds, bytes_up, bytes_down,
// examples, backend, ...}; done: {summary: {statuses, train_seconds, bytes_up, bytes_down, ...}}.
// stderr: the same for people. Exit 0 done, 2 bad arguments or data, 3 server unreachable.

import fs from 'node:fs';

import { parseArgs, parseFleetData, USAGE, UsageError } from './fleet-input.mjs';
import { runFleet, Unreachable } from './fleet-run.mjs';

const EXIT_USAGE = 2;
const EXIT_UNREACHABLE = 3;

function fail(message, code) {
  process.stderr.write(`error: ${String(message).replace(/\s*\n\s*/g, ' ')}\n`);
  process.exit(code);
}

async function main() {
  let options;
  let data;
  try {
    options = parseArgs(process.argv.slice(2));
    if (options.help) {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    let text;
    try {
      text = fs.readFileSync(options.data, 'utf8');
    } catch (error) {
      throw new UsageError(`cannot read --data ${options.data}: ${error.code === 'ENOENT' ? 'no such file' : error.message}`);
    }
    data = parseFleetData(text, options.data);
  } catch (error) {
    if (error instanceof UsageError) fail(error.message, EXIT_USAGE);
    throw error;
  }
  options.enrolToken = process.env.POLLINATE_ENROL_TOKEN || null;
  const tfModule = await import('@tensorflow/tfjs');
  const tf = tfModule.default?.loadLayersModel ? tfModule.default : tfModule;
  const stop = new AbortController();
  for (const signal of ['SIGINT', 'SIGTERM']) process.once(signal, () => stop.abort('signal'));
  try {
    await runFleet(options, data, {
      tf, stop: stop.signal,
      emit: event => process.stdout.write(`${JSON.stringify(event)}\n`),
      log: line => process.stderr.write(`${line}\n`),
    });
  } catch (error) {
    if (error instanceof UsageError) fail(error.message, EXIT_USAGE);
    if (error instanceof Unreachable) fail(error.message, EXIT_UNREACHABLE);
    fail(error?.stack ? `${error.message}` : error, 1);
  }
  return 0;
}

process.exit(await main());
