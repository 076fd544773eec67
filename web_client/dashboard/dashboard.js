// The monitoring dashboard: draws GET /v1/models/{name}/monitor for every model (or ?model=NAME).
// No framework, no build step, nothing loaded from outside this server: plots are inline SVG.

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d",
  "#4b5563", "#9333ea", "#ea580c", "#0d9488", "#be123c", "#1d4ed8"];
const PSI_ALERT = 0.2; // docs/monitoring.md: the default drift threshold
const REFRESH_MS = 30000;

const params = new URLSearchParams(location.search);
const main = document.querySelector("[data-testid=dashboard]");
const bucketSelect = document.querySelector("[data-testid=bucket]");
bucketSelect.value = ["hour", "day", "month"].includes(params.get("bucket")) ? params.get("bucket") : "hour";
bucketSelect.addEventListener("change", () => {
  params.set("bucket", bucketSelect.value);
  history.replaceState(null, "", `${location.pathname}?${params}`);
  refresh();
});

// ------------------------------------------------------------------ small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
const fmt = (v, digits = 3) => (isNumber(v) ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : "–");
const pct = (v) => (isNumber(v) ? `${(100 * v).toFixed(1)} %` : "–");

async function getJSON(url) {
  const answer = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  let body = null;
  try { body = await answer.json(); } catch { /* not JSON */ }
  if (!answer.ok) throw new Error(`${url}: ${answer.status} ${body?.detail ?? answer.statusText}`);
  return body;
}

// ------------------------------------------------------------------ reading the timeline
// Monitor.timeline: per version, per bucket (predictions, feedback, field accuracy, drift).
// Read leniently: a version's buckets may be a list of rows or an object keyed by bucket.

function timelineVersions(timeline) {
  const versions = timeline?.versions ?? timeline ?? {};
  return typeof versions === "object" && versions ? versions : {};
}

function rowsOf(entry) {
  if (Array.isArray(entry)) return entry;
  if (entry && Array.isArray(entry.buckets)) return entry.buckets;
  if (entry && typeof entry === "object") {
    return Object.entries(entry).filter(([, r]) => r && typeof r === "object").map(([k, r]) => ({ bucket: k, ...r }));
  }
  return [];
}

const whenOf = (row) => String(row.bucket ?? row.start ?? row.window ?? row.at ?? row.time ?? "");

function accuracyOf(row) {
  const a = row.field_accuracy ?? row.accuracy;
  if (isNumber(a)) return { value: a };
  return a && isNumber(a.value) ? a : null;
}

function driftOf(row) {
  // {feature: psi} from row.features (the monitor view adds it) or row.drift as an object.
  const drift = row.features ?? (row.drift && typeof row.drift === "object" ? row.drift : {});
  const out = {};
  if (drift && typeof drift === "object") {
    for (const [feature, score] of Object.entries(drift)) {
      const psi = isNumber(score) ? score : score?.psi;
      if (isNumber(psi)) out[feature] = psi;
    }
  }
  return out;
}

function maxDriftOf(row) {
  const values = Object.values(driftOf(row));
  if (values.length) return Math.max(...values);
  const m = isNumber(row.drift) ? row.drift : row.max_drift ?? row.max_psi;
  return isNumber(m) ? m : isNumber(m?.psi) ? m.psi : null;
}

// ------------------------------------------------------------------ plots (inline SVG)

// series: [{name, color, points: [{x: label, y, low, high}]}]; xs: ordered labels.
function linePlot({ testid, xs, series, yMin = 0, yMax = null, threshold = null, yLabel = "", band = false }) {
  const W = 560, H = 226, L = 44, R = 30, T = 18, B = 34;
  const ys = series.flatMap((s) => s.points.flatMap((p) => [p.y, band ? p.high : null])).filter(isNumber);
  let top = yMax ?? Math.max(threshold ?? 0, ...ys, 1e-6) * 1.1;
  if (!(top > yMin)) top = yMin + 1;
  const x = (i) => L + (xs.length <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (xs.length - 1));
  const y = (v) => T + (H - T - B) * (1 - (Math.min(Math.max(v, yMin), top) - yMin) / (top - yMin));
  const root = svg("svg", { class: "plot", viewBox: `0 0 ${W} ${H}`, role: "img", "data-testid": testid,
    "data-points": series.reduce((n, s) => n + s.points.length, 0) });
  root.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  for (const f of [0, 0.5, 1]) {
    const v = yMin + f * (top - yMin);
    root.append(svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, fmt(v, 2)),
      svg("line", { class: "axis", x1: L, y1: y(v), x2: W - R, y2: y(v), opacity: 0.4 }));
  }
  if (yLabel) root.append(svg("text", { x: L, y: 11 }, yLabel));
  const step = Math.max(1, Math.ceil(xs.length / 6));
  xs.forEach((label, i) => {
    if (i % step === 0 || i === xs.length - 1) {
      root.append(svg("text", { x: x(i), y: H - B + 14, "text-anchor": "middle" }, shortTime(label)));
    }
  });
  if (isNumber(threshold)) {
    root.append(svg("line", { class: "threshold", "data-testid": `${testid}-threshold`, x1: L, x2: W - R,
      y1: y(threshold), y2: y(threshold) }));
  }
  const index = new Map(xs.map((label, i) => [label, i]));
  for (const s of series) {
    const pts = s.points.filter((p) => isNumber(p.y) && index.has(p.x));
    if (band) {
      const banded = pts.filter((p) => isNumber(p.low) && isNumber(p.high));
      if (banded.length) {
        const upper = banded.map((p) => `${x(index.get(p.x))},${y(p.high)}`);
        const lower = banded.slice().reverse().map((p) => `${x(index.get(p.x))},${y(p.low)}`);
        root.append(svg("polygon", { class: "band", fill: s.color, points: [...upper, ...lower].join(" "),
          "data-testid": `${testid}-band` }));
      }
    }
    if (pts.length > 1) {
      root.append(svg("polyline", { fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.name,
        points: pts.map((p) => `${x(index.get(p.x))},${y(p.y)}`).join(" ") }));
    }
    for (const p of pts) {
      const extra = band && isNumber(p.low) ? ` [${fmt(p.low)}, ${fmt(p.high)}]` : "";
      root.append(svg("circle", { cx: x(index.get(p.x)), cy: y(p.y), r: 3, fill: s.color, "data-series": s.name },
        svg("title", {}, `${s.name} · ${p.x}: ${fmt(p.y)}${extra}`)));
    }
  }
  return root;
}

function barPlot({ testid, xs, values, color = COLORS[0], yLabel = "" }) {
  const W = 560, H = 186, L = 44, R = 30, T = 18, B = 34;
  const top = Math.max(1, ...values.filter(isNumber));
  const slot = (W - L - R) / Math.max(1, xs.length);
  const root = svg("svg", { class: "plot", viewBox: `0 0 ${W} ${H}`, role: "img", "data-testid": testid,
    "data-points": values.filter((v) => isNumber(v) && v > 0).length });
  root.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("text", { x: L - 4, y: T + 4, "text-anchor": "end" }, fmt(top)),
    svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
  if (yLabel) root.append(svg("text", { x: L, y: 11 }, yLabel));
  const step = Math.max(1, Math.ceil(xs.length / 6));
  xs.forEach((label, i) => {
    const v = isNumber(values[i]) ? values[i] : 0;
    const h = ((H - T - B) * v) / top;
    root.append(svg("rect", { x: L + i * slot + slot * 0.1, y: H - B - h, width: slot * 0.8, height: h, fill: color },
      svg("title", {}, `${label}: ${v}`)));
    if (i % step === 0 || i === xs.length - 1) {
      root.append(svg("text", { x: L + i * slot + slot / 2, y: H - B + 14, "text-anchor": "middle" }, shortTime(label)));
    }
  });
  return root;
}

function shortTime(label) {
  // 2026-12-02T14:00:00Z -> 12-02 14h; 2026-12-02 -> 12-02; 2026-12 stays.
  const m = /^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}))?/.exec(label);
  if (!m) return label.slice(0, 10);
  return m[4] !== undefined ? `${m[2]}-${m[3]} ${m[4]}h` : `${m[2]}-${m[3]}`;
}

function legend(series) {
  return el("div", { class: "legend" }, series.map((s) => el("span", { style: `--swatch:${s.color}` }, s.name)));
}

function figure(testid, caption, plot, extra = null) {
  return el("figure", { "data-testid": `${testid}-figure` }, el("figcaption", {}, caption), plot, extra);
}

// ------------------------------------------------------------------ one model

function focusVersion(view) {
  // The version whose drift is drawn: the stable channel's when it reported, else the busiest.
  const versions = view.report?.versions ?? {};
  const stable = view.channels?.stable?.version;
  if (stable != null && versions[String(stable)]?.predictions > 0) return String(stable);
  let best = null;
  for (const [v, numbers] of Object.entries(versions)) {
    if (best === null || (numbers.predictions ?? 0) > (versions[best].predictions ?? 0)) best = v;
  }
  return best ?? (stable != null ? String(stable) : null);
}

function channelsTable(view) {
  const rows = Object.entries(view.channels ?? {}).sort(([a], [b]) => a.localeCompare(b));
  if (!rows.length) return el("p", { class: "empty", "data-testid": "channels" }, "No channel is set: clients asking for stable get the newest version.");
  return el("table", { "data-testid": "channels" },
    el("thead", {}, el("tr", {}, ["channel", "version", "candidate", "rollout", "shadow", "since"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map(([name, s]) => el("tr", { "data-channel": name },
      el("td", {}, name), el("td", {}, s.version ?? "unset"), el("td", {}, s.candidate_version ?? "–"),
      el("td", {}, isNumber(s.rollout_percent) ? `${s.rollout_percent} %` : "–"),
      el("td", { "data-testid": "shadow" }, s.shadow_version ?? "–"), el("td", {}, s.updated_at ?? "")))));
}

// Versions a federated round published but the acceptance gate held: worse than the last
// accepted version on the held-out data, so their channel did not move (registry/gate.py).
function heldList(view) {
  const held = view.held ?? [];
  if (!held.length) return null;
  return el("div", {}, el("h3", {}, "Held by the federation's acceptance gate"),
    el("ul", { class: "held", "data-testid": "gate-holds" }, held.slice().reverse().map((h) => el("li", {
      "data-version": h.version,
    }, [`v${h.version}`, h.round != null ? `round ${h.round}` : "", h.channel ? `${h.channel} not moved` : "",
      h.reason ?? "", h.created_at ?? ""].filter(Boolean).join(" · ")))));
}

function versionsTable(view) {
  const versions = Object.entries(view.report?.versions ?? {}).sort(([a], [b]) => Number(a) - Number(b));
  if (!versions.length) return el("p", { class: "empty", "data-testid": "versions" }, "No telemetry or feedback yet.");
  return el("table", { "data-testid": "versions" },
    el("thead", {}, el("tr", {}, ["version", "predictions", "errors", "feedback", "field accuracy (95 %)",
      "latency p50 / p95", "shadow agreement", "max drift (PSI)"].map((h) => el("th", {}, h)))),
    el("tbody", {}, versions.map(([v, n]) => {
      const acc = n.field_accuracy;
      const mae = n.field_mae;
      const quality = acc && isNumber(acc.value) ? `${pct(acc.value)} [${pct(acc.low)}, ${pct(acc.high)}] n=${acc.n ?? "?"}`
        : mae && isNumber(mae.value) ? `MAE ${fmt(mae.value)} [${fmt(mae.low)}, ${fmt(mae.high)}] n=${mae.n ?? "?"}` : "–";
      const drift = Object.entries(n.drift ?? {}).map(([, d]) => (isNumber(d) ? d : d?.psi)).filter(isNumber);
      const alerting = Object.values(n.drift ?? {}).some((d) => d?.alert);
      const shadow = n.shadow;
      const agreement = shadow && isNumber(shadow.agreement) ? `${pct(shadow.agreement)} (v${shadow.version ?? "?"})`
        : shadow && isNumber(shadow.compared) && shadow.compared > 0 ? pct(shadow.agreed / shadow.compared) : "–";
      return el("tr", { "data-version": v },
        el("td", {}, v), el("td", {}, fmt(n.predictions)), el("td", {}, fmt(n.errors)), el("td", {}, fmt(n.feedback)),
        el("td", { "data-testid": "field-accuracy" }, quality),
        el("td", {}, `${fmt(n.latency_ms?.p50, 1)} / ${fmt(n.latency_ms?.p95, 1)} ms`),
        el("td", {}, agreement),
        el("td", {}, drift.length ? fmt(Math.max(...drift)) : "–", alerting ? el("span", { class: "badge alert" }, " drift") : null));
    })));
}

function alertsList(view) {
  const alerts = view.report?.alerts ?? [];
  if (!alerts.length) return el("p", { class: "empty", "data-testid": "alerts" }, "No alerts.");
  return el("ul", { class: "alerts", "data-testid": "alerts" }, alerts.slice(-50).reverse().map((a) => el("li", {
    "data-kind": a.kind ?? "alert", class: a.cleared_at ? "muted" : null,
  }, [a.raised_at ?? a.at ?? "", a.kind ?? a.type ?? "alert", a.message ?? [a.version != null ? `v${a.version}` : "",
    a.subject ?? "", isNumber(a.value) ? fmt(a.value) : ""].filter(Boolean).join(" "),
  a.cleared_at ? `cleared ${a.cleared_at}` : ""].filter((part) => part !== "").join(" · "))));
}

function historyList(view) {
  const rows = (view.history ?? []).slice(-10).reverse();
  if (!rows.length) return null;
  return el("details", { "data-testid": "history" }, el("summary", {}, "Channel history"),
    el("ul", {}, rows.map((h) => el("li", {}, [h.at, h.channel, h.action, h.version != null ? `v${h.version}` : "",
      h.candidate_version != null ? `candidate v${h.candidate_version} at ${h.rollout_percent} %` : "", h.reason ?? ""]
      .filter(Boolean).join(" · ")))));
}

function plots(view) {
  const versions = timelineVersions(view.timeline);
  const names = Object.keys(versions).sort((a, b) => Number(a) - Number(b));
  const rowsBy = Object.fromEntries(names.map((v) => [v, rowsOf(versions[v])]));
  const xs = [...new Set(names.flatMap((v) => rowsBy[v].map(whenOf)))].filter(Boolean).sort();
  const colorOf = (i) => COLORS[i % COLORS.length];

  // field accuracy per version, with its interval as a band
  const accuracy = names.map((v, i) => ({ name: `v${v}`, color: colorOf(i), points: rowsBy[v].map((r) => {
    const a = accuracyOf(r);
    return a ? { x: whenOf(r), y: a.value, low: a.low, high: a.high } : null;
  }).filter(Boolean) })).filter((s) => s.points.length);

  // drift per feature of the focus version
  const focus = focusVersion(view);
  const focusRows = focus != null ? rowsBy[focus] ?? [] : [];
  const features = [...new Set(focusRows.flatMap((r) => Object.keys(driftOf(r))))];
  let drift = features.map((f, i) => ({ name: f, color: colorOf(i), points: focusRows
    .map((r) => ({ x: whenOf(r), y: driftOf(r)[f] })).filter((p) => isNumber(p.y)) }));
  if (!features.length) { // only a maximum per bucket: one line per version
    drift = names.map((v, i) => ({ name: `v${v} max`, color: colorOf(i), points: rowsBy[v]
      .map((r) => ({ x: whenOf(r), y: maxDriftOf(r) })).filter((p) => isNumber(p.y)) })).filter((s) => s.points.length);
  }

  // telemetry volume: predictions per bucket, all versions together
  const volume = xs.map((x) => names.reduce((sum, v) => sum + rowsBy[v].filter((r) => whenOf(r) === x)
    .reduce((s, r) => s + (isNumber(r.predictions) ? r.predictions : 0), 0), 0));

  const noData = (testid, text) => el("p", { class: "empty", "data-testid": testid }, text);
  return el("div", { class: "grid" },
    figure("plot-accuracy", "Field accuracy over time (95 % interval)", accuracy.length
      ? linePlot({ testid: "plot-accuracy", xs, series: accuracy, yMin: 0, yMax: 1, band: true, yLabel: "accuracy" })
      : noData("plot-accuracy", "No feedback yet."), legend(accuracy)),
    figure("plot-drift", `Drift per feature (PSI)${focus != null ? `, version ${focus}` : ""}`, drift.length
      ? linePlot({ testid: "plot-drift", xs, series: drift, threshold: PSI_ALERT, yLabel: "PSI" })
      : noData("plot-drift", "No telemetry yet."), legend(drift)),
    figure("plot-volume", "Telemetry volume (predictions reported)", xs.length
      ? barPlot({ testid: "plot-volume", xs, values: volume, yLabel: "predictions" })
      : noData("plot-volume", "No telemetry yet.")),
  );
}

function modelSection(view) {
  const alerts = view.report?.alerts ?? [];
  return el("section", { class: "model", "data-testid": `model-${view.model}`, "data-model": view.model },
    el("h2", {}, view.model, " ", el("span", { class: "badge" }, `latest v${view.latest_version ?? "?"}`),
      alerts.length ? el("span", { class: "badge alert" }, ` ${alerts.length} alert${alerts.length > 1 ? "s" : ""}`) : null),
    el("h3", {}, "Channels and rollout"), channelsTable(view),
    heldList(view),
    el("h3", {}, "Versions in the field"), versionsTable(view),
    plots(view),
    el("h3", {}, "Alerts"), alertsList(view),
    historyList(view));
}

// ------------------------------------------------------------------ the page

async function refresh() {
  main.dataset.state = "loading";
  try {
    const listing = await getJSON("/v1/models");
    const all = (listing.models ?? []).map((m) => m.name).sort();
    const nav = document.querySelector("[data-testid=model-nav]");
    nav.replaceChildren(...all.map((name) => el("a", { href: `/dashboard?model=${encodeURIComponent(name)}` }, name)));
    const wanted = params.get("model");
    const names = wanted ? [wanted] : all;
    if (!names.length) {
      main.replaceChildren(el("p", { class: "empty" }, "The store has no model yet."));
    } else {
      const bucket = encodeURIComponent(bucketSelect.value);
      const views = await Promise.all(names.map((name) => getJSON(`/v1/models/${encodeURIComponent(name)}/monitor?bucket=${bucket}`)
        .catch((error) => ({ model: name, error }))));
      main.replaceChildren(...views.map((view) => (view.error
        ? el("section", { class: "model error", "data-testid": `model-${view.model}` }, String(view.error.message))
        : modelSection(view))));
    }
    document.querySelector("[data-testid=updated]").textContent = `updated ${new Date().toLocaleTimeString()}`;
    main.dataset.state = "ready";
  } catch (error) {
    main.replaceChildren(el("p", { class: "error", "data-testid": "error" }, String(error.message ?? error)));
    main.dataset.state = "error";
  }
}

refresh();
setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
