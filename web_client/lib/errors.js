// Errors the library throws. Every one is a PollinateError with a stable `code`, so an app can
// tell "the user drew nothing" (input-*) from "the server is down" (network) from "a file was
// tampered with" (integrity) without parsing messages.

export class PollinateError extends Error {
  /**
   * @param {string} code   stable, machine-readable: input-shape, input-type, input-nonfinite,
   *                        input-range, integrity, http, network, no-format, model-format,
   *                        not-loaded, no-backend, closed; learning: not-trainable, not-opted-in,
   *                        no-examples, label, weights-mismatch, non-finite, aborted, config
   * @param {string} message one sentence a developer can act on
   * @param {object} [details] extra fields copied onto the error (status, url, file, ...)
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'PollinateError';
    this.code = code;
    Object.assign(this, details);
  }
}

/** Input rejected before the model saw it (wrong shape, not a number, NaN/Infinity, out of range). */
export class InputError extends PollinateError {
  constructor(code, message, details) {
    super(code, message, details);
    this.name = 'InputError';
  }
}

/** A downloaded (or cached) file does not hash to the manifest's sha256: nothing was cached or loaded. */
export class IntegrityError extends PollinateError {
  constructor(message, details) {
    super('integrity', message, details);
    this.name = 'IntegrityError';
  }
}

/** True for failures where a cached copy is a sound answer: no connection, timeout, 5xx. */
export function isUnreachable(error) {
  return error instanceof PollinateError && (error.code === 'network' || (error.code === 'http' && error.status >= 500));
}
