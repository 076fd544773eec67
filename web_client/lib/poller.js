// Calls a check function again and again: every `intervalMs` while it succeeds, backing off
// exponentially (×`factor`, up to `maxIntervalMs`) while it fails, so thousands of pages do
// not hammer a server that is down or restarting. A little jitter spreads pages that were
// opened at the same moment. Stoppable; never keeps a Node process alive on its own.

export class Poller {
  /**
   * @param {() => Promise<unknown>} check
   * @param {{intervalMs?: number, maxIntervalMs?: number, factor?: number, jitter?: number,
   *          onError?: (error: unknown, nextDelayMs: number) => void,
   *          setTimer?: typeof setTimeout, clearTimer?: typeof clearTimeout, random?: () => number}} options
   */
  constructor(check, { intervalMs = 30_000, maxIntervalMs = 10 * 60_000, factor = 2, jitter = 0.1, onError,
    setTimer = setTimeout, clearTimer = clearTimeout, random = Math.random } = {}) {
    if (!(intervalMs > 0) || !(maxIntervalMs >= intervalMs) || !(factor >= 1)) {
      throw new RangeError('poll needs intervalMs > 0, maxIntervalMs >= intervalMs and factor >= 1');
    }
    Object.assign(this, { check, intervalMs, maxIntervalMs, factor, jitter, onError, setTimer, clearTimer, random });
    this.delayMs = intervalMs;
    this.timer = null;
    this.running = false;
    this.failures = 0;
  }

  start() {
    if (this.running) return this;
    this.running = true;
    this.delayMs = this.intervalMs;
    this.schedule();
    return this;
  }

  stop() {
    this.running = false;
    const clearTimer = this.clearTimer;
    if (this.timer !== null) clearTimer(this.timer);
    this.timer = null;
  }

  schedule() {
    const spread = 1 + this.jitter * (2 * this.random() - 1);
    const setTimer = this.setTimer;  // unbound: browsers refuse setTimeout called on another object
    this.timer = setTimer(() => this.tick(), Math.round(this.delayMs * spread));
    this.timer?.unref?.();
  }

  async tick() {
    this.timer = null;
    if (!this.running) return;
    try {
      await this.check();
      this.failures = 0;
      this.delayMs = this.intervalMs;
    } catch (error) {
      this.failures += 1;
      this.delayMs = Math.min(this.delayMs * this.factor, this.maxIntervalMs);
      this.onError?.(error, this.delayMs);
    }
    if (this.running) this.schedule();
  }
}
