// What `fleet.mjs` is told: its command line, its data file, and each simulated browser's
// behaviour in a round. Checked before anything touches the network, so a bad option or a
// malformed data file costs one `error:` line and exit 2, never a half-run fleet.

import { createHash } from 'node:crypto';

export const BEHAVIOURS = Object.freeze(['normal', 'late', 'drop', 'stale']);
export const KINDS = Object.freeze(['browser', 'simulated']);

export const USAGE = `usage: node web_client/tools/fleet.mjs --server URL --model NAME --data FILE.json [options]

Runs one simulated browser per device of FILE.json in this process, each on the web client's
contribute() (TF.js, cpu backend), against a Pollinate server's open federated rounds.

  --server URL       the \`pollinate serve\` origin, e.g. http://127.0.0.1:8000
  --model NAME       the federated model
  --data FILE.json   {"input_shape": [...], "devices": [{"id", "x": [[flat model input]...], "y": [label...],
                     "behaviour"?: "normal"|"late"|"drop"|"stale"}]}
  --rounds R         stop once R distinct rounds were seen and every browser is done with them (default 1)
  --late P           probability a browser posts after its task's deadline (409 stale)   (default 0)
  --drop P           probability a browser trains but never posts                         (default 0)
  --stale P          probability a browser posts for its old task after a newer round     (default 0)
  --seed S           seed of those draws, made per (device, round)                       (default 0)
  --max-examples K   each browser keeps at most K of its examples (a seeded choice)   (default all)
  --poll-ms MS       pause between polling passes while there is nothing to do            (default 500)
  --max-seconds T    stop after T seconds whatever happened                               (default 600)
  --kind KIND        what the browsers say they are on enrolment: browser | simulated     (default browser)
  --channel NAME     the channel each browser loads its model from                        (default stable)

Environment: POLLINATE_ENROL_TOKEN, sent on enrolment when the server asks for one.
stdout: one JSON object per line ({"event": "update", ...}, {"event": "done", "summary": ...});
stderr: the same for people. Exit 0 done, 2 bad arguments or data, 3 server unreachable.`;

/** Bad command line or data file: the CLI prints `error: <message>` and exits 2. */
export class UsageError extends Error {
  constructor(message) {
    super(message);
    this.name = 'UsageError';
  }
}

const NUMBER_OPTIONS = {
  rounds: { flag: '--rounds', integer: true, min: 1 },
  late: { flag: '--late', min: 0, max: 1 },
  drop: { flag: '--drop', min: 0, max: 1 },
  stale: { flag: '--stale', min: 0, max: 1 },
  seed: { flag: '--seed', integer: true, min: 0 },
  maxExamples: { flag: '--max-examples', integer: true, min: 1 },
  pollMs: { flag: '--poll-ms', min: 10 },
  maxSeconds: { flag: '--max-seconds', min: 0, exclusive: true },
};
const STRING_OPTIONS = { server: '--server', model: '--model', data: '--data', kind: '--kind', channel: '--channel' };
const FLAGS = new Map([
  ...Object.entries(NUMBER_OPTIONS).map(([key, o]) => [o.flag, key]),
  ...Object.entries(STRING_OPTIONS).map(([key, flag]) => [flag, key]),
]);

function number(key, text) {
  const { flag, integer, min, max, exclusive } = NUMBER_OPTIONS[key];
  const value = Number(text);
  if (text === '' || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new UsageError(`${flag} takes ${integer ? 'a whole number' : 'a number'}, got ${JSON.stringify(text)}`);
  }
  if (exclusive ? value <= min : value < min) throw new UsageError(`${flag} must be ${exclusive ? 'more than' : 'at least'} ${min}, got ${value}`);
  if (max != null && value > max) throw new UsageError(`${flag} must be at most ${max}, got ${value}`);
  return value;
}

/** argv (without node and the script) → options; `{help: true}` for -h/--help. */
export function parseArgs(argv) {
  const options = {
    server: null, model: null, data: null, rounds: 1, late: 0, drop: 0, stale: 0, seed: 0,
    maxExamples: null, pollMs: 500, maxSeconds: 600, kind: 'browser', channel: 'stable', help: false,
  };
  const given = new Set();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') return { ...options, help: true };
    const [flag, inline] = arg.startsWith('--') && arg.includes('=') ? [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)] : [arg, null];
    const key = FLAGS.get(flag);
    if (!key) throw new UsageError(`unknown argument ${JSON.stringify(arg)} (see --help)`);
    if (given.has(key)) throw new UsageError(`${flag} is given twice`);
    given.add(key);
    const value = inline ?? argv[++i];
    if (value == null || (inline == null && value.startsWith('--'))) throw new UsageError(`${flag} needs a value`);
    options[key] = key in NUMBER_OPTIONS ? number(key, value) : value;
  }
  for (const key of ['server', 'model', 'data']) {
    if (!options[key]) throw new UsageError(`${STRING_OPTIONS[key]} is required (see --help)`);
  }
  let url;
  try {
    url = new URL(options.server);
  } catch {
    throw new UsageError(`--server must be a URL such as http://127.0.0.1:8000, got ${JSON.stringify(options.server)}`);
  }
  if (!['http:', 'https:'].includes(url.protocol)) throw new UsageError(`--server must be an http(s) URL, got ${JSON.stringify(options.server)}`);
  options.server = url.origin;
  if (!/^[a-z0-9][a-z0-9_.-]{0,63}$/.test(options.model)) throw new UsageError(`--model must be a model name (1-64 of a-z 0-9 _ . -), got ${JSON.stringify(options.model)}`);
  if (!/^[a-z0-9_-]{1,32}$/.test(options.channel)) throw new UsageError(`--channel must match [a-z0-9_-]{1,32}, got ${JSON.stringify(options.channel)}`);
  if (!KINDS.includes(options.kind)) throw new UsageError(`--kind must be one of ${KINDS.join(', ')}, got ${JSON.stringify(options.kind)}`);
  const total = options.late + options.drop + options.stale;
  if (total > 1 + 1e-9) throw new UsageError(`--late + --drop + --stale must be at most 1, got ${total}`);
  return options;
}

/**
 * The data file's text → {inputShape, devices: [{id, x: Float32Array[], y: (number|string)[], behaviour|null}]}.
 * `x` holds the model's input per example (preprocessed, flattened); `y` class indices or labels.
 */
export function parseFleetData(text, source = 'the data file') {
  let data;
  try {
    data = JSON.parse(text);
  } catch (error) {
    throw new UsageError(`${source} is not JSON: ${error.message}`);
  }
  if (!data || typeof data !== 'object' || Array.isArray(data)) throw new UsageError(`${source} must hold a JSON object with "input_shape" and "devices"`);
  const shape = data.input_shape;
  if (!Array.isArray(shape) || shape.length === 0 || !shape.every(d => Number.isInteger(d) && d > 0)) {
    throw new UsageError(`${source}: "input_shape" must be a list of positive whole numbers, e.g. [8, 8, 1]; got ${JSON.stringify(shape)}`);
  }
  const size = shape.reduce((a, b) => a * b, 1);
  if (!Array.isArray(data.devices) || data.devices.length === 0) throw new UsageError(`${source}: "devices" must be a non-empty list`);
  const ids = new Set();
  const devices = data.devices.map((device, d) => {
    const where = `${source}: devices[${d}]`;
    if (!device || typeof device !== 'object') throw new UsageError(`${where} must be an object with "id", "x" and "y"`);
    const { id, x, y } = device;
    if (typeof id !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/.test(id)) {
      throw new UsageError(`${where}.id must be 1-64 of A-Z a-z 0-9 _ . : - (starting with a letter or digit), got ${JSON.stringify(id)}`);
    }
    if (ids.has(id)) throw new UsageError(`${where}.id ${JSON.stringify(id)} appears twice`);
    ids.add(id);
    if (!Array.isArray(x) || x.length === 0) throw new UsageError(`${where} (${id}) has no examples: "x" must be a non-empty list`);
    if (!Array.isArray(y) || y.length !== x.length) throw new UsageError(`${where} (${id}) has ${x.length} inputs in "x" but ${Array.isArray(y) ? y.length : 'no list of'} labels in "y"`);
    const inputs = x.map((row, i) => {
      if (!Array.isArray(row) || row.length !== size) {
        throw new UsageError(`${where}.x[${i}] (${id}) must be a flat list of ${size} numbers (input_shape [${shape}]), got ${Array.isArray(row) ? `${row.length} values` : JSON.stringify(row)}`);
      }
      const values = Float32Array.from(row, Number);
      const bad = row.findIndex((v, k) => typeof v !== 'number' || !Number.isFinite(values[k]));
      if (bad >= 0) throw new UsageError(`${where}.x[${i}][${bad}] (${id}) must be a finite number, got ${JSON.stringify(row[bad])}`);
      return values;
    });
    y.forEach((label, i) => {
      const ok = (Number.isInteger(label) && label >= 0) || (typeof label === 'string' && label.length > 0);
      if (!ok) throw new UsageError(`${where}.y[${i}] (${id}) must be a class index or a label, got ${JSON.stringify(label)}`);
    });
    const behaviour = device.behaviour ?? null;
    if (behaviour !== null && !BEHAVIOURS.includes(behaviour)) {
      throw new UsageError(`${where}.behaviour (${id}) must be one of ${BEHAVIOURS.join(', ')}, got ${JSON.stringify(behaviour)}`);
    }
    return { id, x: inputs, y: [...y], behaviour };
  });
  return { inputShape: [...shape], devices };
}

/** The device with at most `limit` of its examples, a choice fixed by (seed, device); all when null. */
export function keepExamples(device, limit, seed = 0) {
  if (limit == null || device.x.length <= limit) return device;
  const order = device.x.map((_, i) => [uniform(seed, `${device.id}#example`, i), i]).sort((a, b) => a[0] - b[0]);
  const kept = order.slice(0, limit).map(([, i]) => i).sort((a, b) => a - b);
  return { ...device, x: kept.map(i => device.x[i]), y: kept.map(i => device.y[i]) };
}

/** A number in [0, 1) fixed by (seed, device, round): the same run draws the same behaviours. */
export function uniform(seed, device, round) {
  const digest = createHash('sha256').update(`${seed}\u0000${device}\u0000${round}`).digest();
  return digest.readUInt32BE(0) / 2 ** 32;
}

/** 'drop' | 'late' | 'stale' | 'normal' for this device in this round (a forced behaviour wins). */
export function drawBehaviour({ seed = 0, late = 0, drop = 0, stale = 0 }, device, round, forced = null) {
  if (forced) return forced;
  const u = uniform(seed, device, round);
  if (u < drop) return 'drop';
  if (u < drop + late) return 'late';
  if (u < drop + late + stale) return 'stale';
  return 'normal';
}
