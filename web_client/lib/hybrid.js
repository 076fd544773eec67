// Hybrid serving: predict on the device when the model can run here, else ask the server.
//
// createClient({mode}): 'local' (the default: TF.js only, as before), 'server' (never loads
// TF.js or the model's files: every prediction is POST /v1/models/{name}/predict), 'auto'
// (local, and the server's predict when the model cannot load here: no TF.js backend starts,
// the files are larger than maxModelBytes, a file fails its sha256 check or cannot be
// fetched, TF.js cannot read or run the format). The server answers with the LiteRT float32
// artifact of the version this client's manifest names (same channel and client id, so the
// same cohort), so both paths give the same numbers (≤ 1e-4 apart: float32 kernels differ).

import { InputError, PollinateError } from './errors.js';

export const MODES = ['auto', 'local', 'server'];

/** Error codes after which 'auto' answers from the server rather than failing the load. */
const LOCAL_FAILURES = new Set([
  'no-backend', 'tf-unavailable', 'too-large', 'integrity', 'model-format', 'no-format', 'model-run', 'network', 'http',
]);

/** Whether a failure to load the model here should send 'auto' to the server's predict. */
export function localFailure(error) {
  if (error instanceof InputError) return false;  // the manifest's input spec: the server would refuse too
  if (!(error instanceof PollinateError)) return true;  // TF.js itself threw (a format it cannot load, a backend that broke)
  return LOCAL_FAILURES.has(error.code);
}

/** {code, message}: why the client answers from the server (kept on client.fallback). */
export function describeFallback(error) {
  return { code: error?.code ?? 'tf-error', message: error?.message ?? String(error) };
}

/** Bytes of a TF.js format entry's files (model.json + shards), as the manifest lists them. */
export function formatBytes(entry) {
  return (entry?.files ?? []).reduce((n, f) => n + (Number.isFinite(f.bytes) ? f.bytes : Number.isFinite(f.size) ? f.size : 0), 0);
}

/** POST URL of the server's predict, with the channel and client id the manifest was asked with. */
export function predictUrl(serverUrl, model, channel, clientId) {
  const url = new URL(`/v1/models/${encodeURIComponent(model)}/predict`, serverUrl + '/');
  url.searchParams.set('channel', channel);
  if (clientId) url.searchParams.set('client_id', clientId);
  return url.href;
}

/** Bytes of JSON the client puts in one predict request: the server refuses bodies over 64 KiB. */
export const MAX_PREDICT_BODY = 60_000;

/** [from, to) index ranges of `parts` whose JSON stays under `limit` bytes (at least one part each). */
export function chunksUnder(parts, limit) {
  const ranges = [];
  let from = 0;
  let bytes = 16;  // {"inputs":[]} / {"rows":[]}
  parts.forEach((part, i) => {
    const size = new TextEncoder().encode(JSON.stringify(part)).length + 1;
    if (i > from && bytes + size > limit) {
      ranges.push([from, i]);
      from = i;
      bytes = 16;
    }
    bytes += size;
  });
  if (parts.length > from) ranges.push([from, parts.length]);
  return ranges;
}

/** A flat sample as nested arrays of `shape` (JSON for the server's `inputs`). */
export function nest(flat, shape) {
  const values = Array.from(flat, Number);
  if (shape.length <= 1) return values;
  const build = (offset, dims) => {
    if (dims.length === 1) return values.slice(offset, offset + dims[0]);
    const stride = dims.slice(1).reduce((a, b) => a * b, 1);
    return Array.from({ length: dims[0] }, (_, i) => build(offset + i * stride, dims.slice(1)));
  };
  return build(0, shape);
}

/** Flattens one example's output (a number, or nested lists of numbers) to a Float32Array. */
export function flatOutput(output) {
  if (typeof output === 'number') return Float32Array.of(output);
  if (!Array.isArray(output)) throw new PollinateError('http', `the server's predict answered an output that is not numbers: ${JSON.stringify(output)?.slice(0, 80)}`);
  return Float32Array.from(output.flat(Infinity), Number);
}
