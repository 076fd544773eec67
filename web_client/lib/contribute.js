// One contribution to the open federated round, the way a browser makes it:
//
//   consent? → examples? → enrol (once; token kept) → GET task (204: nothing to do)
//   → the base version's LayersModel (cached files, sha256-checked) + the task's base weights
//   → train config.epochs over the kept examples on a backend that can train
//   → local − base in the task's order → POST float32 LE with examples=N → 202
//
// Refusals are handled the way the protocol means them: 401 → enrol again, once; 409 stale
// (the round closed, or its deadline passed, while this device trained) → fetch the current
// task and start over (twice at most); 409 duplicate → this device's update is already in.
// Anything else is thrown. An AbortSignal cancels between steps and between batches; the
// inference backend is always restored and the training copy of the model freed.

import { PollinateError } from './errors.js';
import { inputContract } from './input.js';
import { refusalOf } from './protocol.js';
import { fitOnExamples, throwIfAborted, trainingBackendFor, withBackend } from './training.js';
import { flatSize, float32LE, fromFloat32LE, l2Norm, readFlat, weightDelta, weightsInSpecOrder, writeFlat } from './weights.js';

const STALE_RETRIES = 2;

/**
 * @param {import('../pollinate.js').PollinateClient} client
 * @param {object} [options]
 * @param {AbortSignal} [options.signal]
 * @param {(progress: object) => void} [options.onProgress] {phase: 'enrol'|'task'|'download'|'train'|'upload'|'done', …}
 * @param {string} [options.trainBackend] force the training backend
 * @param {string} [options.kind] the device kind sent on enrolment (default 'browser')
 * @returns {Promise<object>} {status: 'accepted'|'no-task'|'no-examples'|'duplicate', …}
 */
export async function contribute(client, { signal = null, onProgress = null, trainBackend = null, kind = 'browser' } = {}) {
  const progress = update => {
    try {
      onProgress?.(update);
    } catch { /* a progress display must not break a contribution */ }
  };
  throwIfAborted(signal);
  if (!(await client.optedIn())) {
    throw new PollinateError('not-opted-in', `contributing to ${client.modelName} needs the user's consent: call optIn() when they turn "help improve this model" on`);
  }
  const examples = await client.examples.list();
  if (examples.length === 0) {
    progress({ phase: 'done', status: 'no-examples' });
    return { status: 'no-examples', examples: 0 };
  }
  await client.ensureTf();
  let reenrolled = false;
  let staleRetries = 0;
  for (;;) {
    throwIfAborted(signal);
    const device = await client.deviceIdentity({ signal, kind, onEnrol: () => progress({ phase: 'enrol' }) });
    try {
      const result = await attempt(client, device, examples, { signal, progress, trainBackend });
      progress({ phase: 'done', ...result });
      return result;
    } catch (error) {
      const refusal = refusalOf(error);
      if (refusal === 'unauthorized' && !reenrolled) {
        reenrolled = true;
        await client.forgetDevice();
        continue;
      }
      if ((refusal === 'stale' || refusal === 'unknown_task') && staleRetries < STALE_RETRIES) {
        staleRetries += 1;
        progress({ phase: 'task', retry: staleRetries, reason: error.detail ?? error.message });
        continue;
      }
      if (refusal === 'duplicate') {
        const result = { status: 'duplicate', detail: error.detail ?? error.message };
        progress({ phase: 'done', ...result });
        return result;
      }
      throw error;
    }
  }
}

async function attempt(client, device, examples, { signal, progress, trainBackend }) {
  const { protocol, tf } = client;
  progress({ phase: 'task' });
  const task = await protocol.task(device.token, { signal });
  if (!task) return { status: 'no-task', examples: examples.length };
  const spec = task.weights;
  const size = flatSize(spec ?? []);
  if (!Array.isArray(spec) || size === 0 || (task.size != null && task.size !== size)) {
    throw new PollinateError('weights-mismatch', `task ${task.task_id} lists weights of ${size} values but says size ${task.size}`);
  }
  const config = task.config ?? {};
  const about = { taskId: task.task_id, round: task.round, baseVersion: task.base_version };
  const inference = client.backend;
  const training = trainingBackendFor(inference, trainBackend);
  progress({ phase: 'download', ...about });
  const bytesDownBefore = client.bytesDownloaded();
  const baseBytes = await protocol.baseWeights(device.token, task, { signal });
  const base = fromFloat32LE(baseBytes, size);
  throwIfAborted(signal);
  const trained = await withBackend(tf, training.name, async () => {
    const { model, manifest } = await client.loadTrainableModel(task.base_version ?? client.version, { signal });
    try {
      const variables = weightsInSpecOrder(model, spec);
      writeFlat(tf, variables, base);
      progress({ phase: 'train', ...about, epoch: 0, epochs: config.epochs ?? 1, backend: training.name });
      const fit = await fitOnExamples(tf, model, examples, {
        inputShape: inputContract(manifest).shape,
        epochs: config.epochs ?? 1, batchSize: config.batch_size ?? 32, learningRate: config.learning_rate ?? 1e-3,
        signal, onEpoch: e => progress({ phase: 'train', ...about, ...e, backend: training.name }),
      });
      return { fit, delta: weightDelta(readFlat(variables), base) };
    } finally {
      model.dispose();
    }
  });
  const bytesDown = client.bytesDownloaded() - bytesDownBefore;
  throwIfAborted(signal);
  const norm = l2Norm(trained.delta);
  progress({ phase: 'upload', ...about, norm, bytes: trained.delta.length * 4 });
  const answer = await protocol.sendUpdate(device.token, task, float32LE(trained.delta), { examples: examples.length, signal });
  return {
    status: 'accepted', ...about, accepted: answer.accepted, serverNorm: answer.norm, clipped: answer.clipped,
    examples: examples.length, norm, backend: training.name, inferenceBackend: inference, backendReason: training.reason,
    lossBefore: trained.fit.lossBefore, lossAfter: trained.fit.lossAfter, epochs: trained.fit.epochs,
    seconds: trained.fit.seconds, bytesUp: trained.delta.length * 4, bytesDown, deviceId: device.device_id,
  };
}
