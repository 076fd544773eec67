// The demo page's "Teach it" card: after a prediction the user can say what the digit really
// was (the correction is kept in this browser's IndexedDB, nowhere else), and a "help improve
// this model" switch (off until the user turns it on; the choice is remembered) contributes
// to the federation's open round: this browser trains a copy of the round's model on its
// corrections and sends only local − base. The new version the round produces arrives like
// any other, through the page's update check.
//
// The status line carries data-phase (off, enrol, task, download, train, upload, done,
// error), data-status (accepted, no-task, no-examples, duplicate), data-round and
// data-accepted (the round's accepted updates, from GET …/status) for people and tests alike.
//
// With the page's "Share usage counts" switch on (client.optInTelemetry()), a saved correction
// is also sent as feedback naming the prediction's id ("it was a 7", docs/monitoring.md
// section 3): only the label, never the drawing. The telemetry line's data-feedback says how
// the last one went (sent, queued, dropped, error).

const WORDS = {
  enrol: () => 'Joining the federation…',
  task: p => (p.retry ? `The round moved on; asking for the current one (retry ${p.retry})…` : 'Asking for the open round…'),
  download: p => `Round ${p.round}: getting the model (v${p.baseVersion}) and the round’s weights…`,
  train: p => `Round ${p.round}: training on your corrections (${p.backend})${p.epoch ? ` · epoch ${p.epoch}/${p.epochs} · loss ${Number(p.loss).toFixed(3)}` : '…'}`,
  upload: p => `Round ${p.round}: sending the weight change (${(p.bytes / 1024).toFixed(0)} KB, nothing else)…`,
};

export function createLearning(client, els, { contributeMs = 30_000 } = {}) {
  const state = {
    result: null, count: 0, running: null, controller: null, timer: null, last: null, status: null, on: false,
    savedInput: null,  // the drawing corrected last: a re-run of it (e.g. on a new version) is not saved twice
    feedback: null,    // what the last correction's feedback did: {sent|queued|dropped, …} or {error}
  };
  const sameInput = (a, b) => Boolean(a && b) && a.length === b.length && a.every((v, i) => v === b[i]);

  function setStatus(text, { phase, status = '', round = null } = {}) {
    els.status.textContent = text;
    els.status.dataset.phase = phase;
    els.status.dataset.status = status;
    if (round != null) els.status.dataset.round = String(round);
  }

  function renderCount() {
    els.count.textContent = String(state.count);
    els.countLabel.textContent = state.count === 1 ? 'correction kept in this browser' : 'corrections kept in this browser';
    els.clear.hidden = state.count === 0;
  }

  function fillLabels() {
    const labels = client.labels ?? [];
    const have = [...els.correction.options].map(o => o.value).filter(Boolean);
    if (have.join() === labels.join()) return;
    els.correction.replaceChildren(...labels.map(label => {
      const option = document.createElement('option');
      option.value = label;
      option.textContent = label;
      return option;
    }));
  }

  /** A prediction was shown: the user may now correct it (the select starts at the guess). */
  function onResult(result) {
    state.result = result;
    if (!Array.isArray(client.labels) || !result?.modelInput) return;
    fillLabels();
    els.correction.value = result.label;
    els.correction.disabled = false;
    els.save.disabled = sameInput(result.modelInput, state.savedInput);
  }

  function onClear() {
    state.result = null;
    els.correction.disabled = true;
    els.save.disabled = true;
  }

  async function saveCorrection() {
    const result = state.result;
    if (!result) return state.count;
    const label = els.correction.value;
    state.count = await client.addExample(result.modelInput, label);
    state.savedInput = result.modelInput;
    renderCount();
    if (client.telemetryOptedIn?.() && result.id) sendFeedback(result, label).catch(() => {});
    els.save.disabled = true;  // one correction per drawing
    if (!state.on) {
      setStatus(`Saved: that was a ${label}. Turn on “Help improve this model” to let this browser learn from it.`, { phase: 'off' });
    } else if (!state.running) {
      contributeNow().catch(() => {});
    }
    return state.count;
  }

  /** "It was a 7": the label for the prediction's id, when the user shares usage counts. */
  async function sendFeedback(result, label) {
    const line = els.telemetryStatus;
    try {
      state.feedback = await client.feedback({ predictionId: result.id, label });
    } catch (error) {
      state.feedback = { error: error.message };
    }
    if (line) {
      const how = state.feedback.sent ? 'sent' : state.feedback.queued ? 'queued' : state.feedback.dropped ? 'dropped' : 'error';
      line.dataset.feedback = how;
      line.dataset.feedbackFor = result.id;
      const words = { sent: 'sent', queued: 'kept to send when the server answers', dropped: 'refused by the server', error: 'not sent' };
      line.textContent = `Your correction (${result.label} → ${label}) was ${words[how]}: only the digit, never the drawing.`;
    }
    return state.feedback;
  }

  async function forgetCorrections() {
    await client.examples.clear();
    state.count = 0;
    renderCount();
  }

  async function roundSummary() {
    try {
      const s = await client.federationStatus();
      state.status = s;
      els.status.dataset.accepted = String(s.accepted ?? 0);
      if (s.round != null) els.status.dataset.round = String(s.round);
      if (s.round == null) return 'no federated round yet';
      return `round ${s.round} ${s.open ? 'open' : 'closed'}, ${s.accepted} update${s.accepted === 1 ? '' : 's'} accepted`;
    } catch {
      return '';
    }
  }

  function describe(outcome) {
    switch (outcome.status) {
      case 'accepted':
        return `Round ${outcome.round}: your update was accepted (trained on ${outcome.examples} correction${outcome.examples === 1 ? '' : 's'} on ${outcome.backend}, loss ${outcome.lossBefore.toFixed(3)} → ${outcome.lossAfter.toFixed(3)}). The next version arrives on its own.`;
      case 'no-task':
        return 'No round is waiting for this browser right now.';
      case 'no-examples':
        return 'Nothing to learn from yet: correct a digit first.';
      case 'duplicate':
        return 'This browser’s update for this round is already in.';
      default:
        return outcome.status;
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = null;
    if (state.on && contributeMs > 0) state.timer = setTimeout(() => contributeNow().catch(() => {}), contributeMs);
  }

  /** One contribution now (or the one already running); the switch must be on. */
  function contributeNow() {
    if (state.running) return state.running;
    if (!state.on) return Promise.resolve(null);
    clearTimeout(state.timer);
    const controller = new AbortController();
    state.controller = controller;
    state.running = (async () => {
      try {
        const outcome = await client.contribute({
          signal: controller.signal,
          onProgress: p => {
            if (p.phase !== 'done' && !controller.signal.aborted) setStatus(WORDS[p.phase]?.(p) ?? p.phase, { phase: p.phase, round: p.round });
          },
        });
        state.last = outcome;
        const summary = await roundSummary();
        if (!controller.signal.aborted) {
          setStatus(`${describe(outcome)}${summary ? ` · Now: ${summary}.` : ''}`, { phase: 'done', status: outcome.status, round: outcome.round });
        }
        return outcome;
      } catch (error) {
        state.last = { status: 'error', error: error.message, code: error.code };
        if (error.code !== 'aborted' && !controller.signal.aborted) setStatus(`Could not contribute: ${error.message}`, { phase: 'error' });
        throw error;
      } finally {
        state.running = null;
        state.controller = null;
        schedule();
      }
    })();
    return state.running;
  }

  async function setOn(on) {
    state.on = on;
    els.help.checked = on;
    if (on) {
      await client.optIn();
      setStatus('On: looking for the open round…', { phase: 'task' });
      return contributeNow().catch(() => null);
    }
    clearTimeout(state.timer);
    state.controller?.abort(new Error('switched off'));
    setStatus('Off: nothing is sent.', { phase: 'off' });
    await client.optOut();
    return null;
  }

  /** After the model loaded: counts, the remembered switch, and a contribution if it is on. */
  async function start() {
    state.count = await client.examples.count();
    renderCount();
    if (client.modelKind !== 'layers') {
      els.help.disabled = true;
      setStatus(`This version is a ${client.modelKind} model: TF.js can only train a LayersModel, so this browser cannot contribute.`, { phase: 'off' });
      return;
    }
    els.help.disabled = false;
    if (await client.optedIn()) await setOn(true);
  }

  els.save.addEventListener('click', () => saveCorrection().catch(error => setStatus(`Could not save: ${error.message}`, { phase: 'error' })));
  els.clear.addEventListener('click', () => forgetCorrections().catch(() => {}));
  els.help.addEventListener('change', () => setOn(els.help.checked).catch(error => setStatus(`Could not switch: ${error.message}`, { phase: 'error' })));
  renderCount();

  return {
    start, onResult, onClear, saveCorrection, contributeNow, setOn,
    get state() {
      return { count: state.count, on: state.on, running: Boolean(state.running), last: state.last, status: state.status, feedback: state.feedback };
    },
  };
}
