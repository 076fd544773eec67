// The device protocol over HTTP (docs/ has the contract; server/routers/federations.py answers):
//
//   POST /v1/federations/{model}/devices                     → 201 {device_id, token}
//   GET  /v1/federations/{model}/task                        → 200 task | 204 nothing to do
//   GET  /v1/federations/{model}/tasks/{id}/weights          → the task's base weights (float32 LE)
//   POST /v1/federations/{model}/tasks/{id}/updates?examples=N  local − base → 202
//   GET  /v1/federations/{model}/status                      → {round, open, accepted, refused}
//
// Each call goes through the client's request() (timeout, fetch log, errors as PollinateError
// with `status` and `detail`), so a refusal reads like any other HTTP error; refusalOf() names it.

const json = body => JSON.parse(new TextDecoder().decode(body));

/** The protocol's name for a refused request: unauthorized, unknown_task, stale, duplicate, too_large, invalid; else null. */
export function refusalOf(error) {
  if (error?.code !== 'http') return null;
  switch (error.status) {
    case 401: return 'unauthorized';
    case 404: return 'unknown_task';
    case 409: return /already|duplicate/i.test(String(error.detail ?? '')) ? 'duplicate' : 'stale';
    case 413: return 'too_large';
    case 422: return 'invalid';
    default: return null;
  }
}

export class DeviceProtocol {
  /**
   * @param {object} options
   * @param {(kind: string, url: string, init?: object) => Promise<{response: Response, body: ArrayBuffer|null}>} options.request
   * @param {string} options.serverUrl
   * @param {string} options.model
   * @param {string} [options.enrolToken] sent on enrolment when the server requires one (POLLINATE_ENROL_TOKEN)
   */
  constructor({ request, serverUrl, model, enrolToken = null }) {
    Object.assign(this, { request, serverUrl, model, enrolToken });
  }

  url(path) {
    return new URL(`/v1/federations/${encodeURIComponent(this.model)}${path}`, this.serverUrl + '/').href;
  }

  /** A new device identity: {device_id, token}. */
  async enrol(kind = 'browser', { signal } = {}) {
    const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
    if (this.enrolToken) headers.Authorization = `Bearer ${this.enrolToken}`;
    const { body } = await this.request('enrol', this.url('/devices'), { method: 'POST', headers, body: JSON.stringify({ kind }), signal });
    return json(body);
  }

  /** The task for this device, or null when no round is open for it (204). */
  async task(token, { signal } = {}) {
    const { response, body } = await this.request('task', this.url('/task'), {
      headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' }, cache: 'no-store', signal,
    });
    if (response.status === 204 || !body || body.byteLength === 0) return null;
    return json(body);
  }

  /** The task's base weights: ArrayBuffer of float32 little-endian values. */
  async baseWeights(token, task, { signal } = {}) {
    const { body } = await this.request('weights', this.url(`/tasks/${encodeURIComponent(task.task_id)}/weights`), {
      headers: { Authorization: `Bearer ${token}` }, signal,
    });
    return body;
  }

  /** Sends local − base (bytes) for `examples` training examples: the server's 202 body. */
  async sendUpdate(token, task, bytes, { examples, dtype = 'float32', signal } = {}) {
    const url = new URL(this.url(`/tasks/${encodeURIComponent(task.task_id)}/updates`));
    url.searchParams.set('examples', String(examples));
    if (dtype !== 'float32') url.searchParams.set('dtype', dtype);
    const { body } = await this.request('update', url.href, {
      method: 'POST', body: bytes, signal,
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/octet-stream', Accept: 'application/json' },
    });
    return json(body);
  }

  /** The federation's current round as the server reports it (no token needed). */
  async status({ signal } = {}) {
    const { body } = await this.request('status', this.url('/status'), { headers: { Accept: 'application/json' }, cache: 'no-store', signal });
    return json(body);
  }
}
