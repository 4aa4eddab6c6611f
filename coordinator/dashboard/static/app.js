// Ember's fleet dashboard: what `ember top` shows, read by the browser straight from the broker
// over MQTT-over-WebSockets, plus each job's accuracy curve. The topics and their JSON documents
// are described in docs/topics.md. Everything received is data: it is put in the page with
// textContent and SVG attributes, never as HTML.

import { MqttWsClient } from "./mqtt-ws.js";

const MAX_DOCUMENT = 1 << 20;
const MAX_POINTS = 1000;
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const SVG = "http://www.w3.org/2000/svg";

const fleet = { agents: new Map(), jobs: new Map() };
let prefix = "ember/v1";
let client = null;
let pending = null;

// -- configuration: the query string wins over the server's config.json -------------------------

async function loadConfig() {
  const query = new URLSearchParams(location.search);
  let config = {};
  try {
    const response = await fetch("config.json", { cache: "no-store" });
    if (response.ok) config = await response.json();
  } catch (err) {
    // Opened without the server (a saved page): the query string must say everything.
  }
  return {
    ws_url: query.get("broker") || config.ws_url || "",
    prefix: query.get("prefix") || config.prefix || "ember/v1",
  };
}

// -- folding documents ---------------------------------------------------------------------------

function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function agent(id) {
  if (!fleet.agents.has(id)) fleet.agents.set(id, { id, progress: new Map() });
  return fleet.agents.get(id);
}

function job(id) {
  if (!fleet.jobs.has(id)) fleet.jobs.set(id, { id, state: null, accuracy: new Map() });
  return fleet.jobs.get(id);
}

function record(view, version, accuracy) {
  if (!Number.isInteger(version) || version < 0 || num(accuracy) === null) return;
  view.accuracy.set(version, accuracy);
  if (view.accuracy.size > MAX_POINTS) {
    const oldest = [...view.accuracy.keys()].sort((a, b) => a - b)[0];
    view.accuracy.delete(oldest);
  }
}

function fold(topic, doc) {
  const levels = topic.slice(prefix.length + 1).split("/");
  const [kind, id] = levels;
  if (kind === "agents" && levels.length === 3) {
    const leaf = levels[2];
    if (!["status", "info", "telemetry", "roles"].includes(leaf)) return;
    const view = agent(id);
    if (doc === null) delete view[leaf];
    else view[leaf] = doc;
  } else if (kind === "jobs" && levels.length === 3 && levels[2] === "state") {
    if (doc === null) {
      fleet.jobs.delete(id);
      return;
    }
    const view = job(id);
    view.state = doc;
    const points = doc.history && Array.isArray(doc.history.points) ? doc.history.points : [];
    for (const p of points) if (p && typeof p === "object") record(view, p.version, p.accuracy);
    if (doc.metrics && typeof doc.metrics === "object") {
      record(view, doc.model_version, doc.metrics.accuracy);
    }
  } else if (kind === "jobs" && levels.length === 4 && levels[2] === "metrics") {
    if (doc && doc.event === "model_version" && fleet.jobs.has(id)) {
      record(job(id), doc.version, doc.accuracy);
    }
  } else if (kind === "jobs" && levels.length === 5 && levels[2] === "agents") {
    if (levels[4] !== "progress") return;
    const view = agent(levels[3]);
    if (doc === null) view.progress.delete(id);
    else view.progress.set(id, doc);
  }
}

function onMessage(topic, payload) {
  if (!topic.startsWith(prefix + "/")) return;
  if (payload.length > MAX_DOCUMENT) {
    console.warn("document too large, skipped", topic, payload.length);
    return;
  }
  let doc = null;
  if (payload.length) {
    try {
      doc = JSON.parse(new TextDecoder().decode(payload));
    } catch (err) {
      console.warn("not JSON, skipped", topic, String(err));
      return;
    }
    if (!doc || typeof doc !== "object" || Array.isArray(doc)) {
      console.warn("not a JSON object, skipped", topic);
      return;
    }
  }
  fold(topic, doc);
  scheduleRender();
}

// -- drawing -------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function percent(value) {
  return num(value) === null ? "" : `${Math.round(value)}%`;
}

function progressOf(view, now) {
  const state = view.state || {};
  let value = num(state.progress) || 0;
  const minutes = state.stop ? num(state.stop.max_minutes) : null;
  const started = num(state.started);
  if (state.phase === "running" && minutes && started !== null) {
    value = Math.max(value, (now - started) / (minutes * 60));
  }
  return Math.min(1, Math.max(0, value));
}

function stopRules(stop) {
  if (!stop || typeof stop !== "object") return "";
  const parts = [];
  if (num(stop.target_accuracy) !== null) parts.push(`acc ≥ ${stop.target_accuracy}`);
  if (num(stop.max_versions) !== null) parts.push(`${stop.max_versions} versions`);
  if (num(stop.max_updates) !== null) parts.push(`${stop.max_updates} updates`);
  if (num(stop.max_minutes) !== null) parts.push(`${stop.max_minutes} min`);
  return parts.join(" · ");
}

function temperature(telemetry) {
  if (num(telemetry.temperature_max) !== null) return `${Math.round(telemetry.temperature_max)}°C`;
  const values = Object.values(telemetry.temperature || {}).filter((v) => num(v) !== null);
  return values.length ? `${Math.round(Math.max(...values))}°C` : "";
}

function roleText(view) {
  const out = [];
  const roles = (view.roles && view.roles.roles) || {};
  for (const key of Object.keys(roles).sort()) {
    const r = roles[key] || {};
    if (!["running", "starting", "failed", "refused"].includes(r.state)) continue;
    const [jobId, role] = key.split("/");
    const live = view.progress.get(jobId);
    const now = live && live.roles && live.roles[role];
    let text = key;
    if (r.state !== "running") text += ` (${r.state})`;
    else if (now && typeof now.state === "string") text += ` ${now.state}`;
    out.push(text);
  }
  return out.join(", ");
}

function renderAgents() {
  const body = document.querySelector("#agents tbody");
  const rows = [];
  for (const view of [...fleet.agents.values()].sort((a, b) => (a.id < b.id ? -1 : 1))) {
    if (!view.status && !view.info && !view.telemetry && !view.roles) continue;
    const t = view.telemetry || {};
    const online = view.status && view.status.state === "online";
    const reason = view.status && !online && view.status.reason ? ` (${view.status.reason})` : "";
    const memory = t.memory && typeof t.memory === "object" ? t.memory.percent : null;
    rows.push(
      el(
        "tr",
        { "data-agent": view.id, class: online ? "online" : "offline" },
        el("td", { class: "name" }, view.id),
        el("td", { class: "state" }, online ? "online" : `offline${reason}`),
        el("td", { class: "num" }, percent(t.cpu_percent)),
        el("td", { class: "num" }, percent(memory)),
        el("td", { class: "num" }, temperature(t)),
        el("td", { class: "num" }, num(t.updates_sent) === null ? "" : t.updates_sent),
        el("td", { class: "roles" }, roleText(view)),
      ),
    );
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "empty" }, "no agents yet")));
  body.replaceChildren(...rows);
  return rows.length;
}

function sparkline(points) {
  const width = 120;
  const height = 24;
  const box = svg("svg", { class: "spark", width, height, viewBox: `0 0 ${width} ${height}` });
  const tail = points.slice(-40);
  if (tail.length < 2) return box;
  const values = tail.map(([, a]) => a);
  const low = Math.min(...values);
  const span = Math.max(...values) - low || 1;
  const coords = tail.map(([, a], i) => [
    (i / (tail.length - 1)) * (width - 2) + 1,
    height - 2 - ((a - low) / span) * (height - 4),
  ]);
  box.append(svg("polyline", { points: coords.map((c) => c.join(",")).join(" ") }));
  return box;
}

function curve(points, target) {
  // Accuracy (0-1) against model version, with the target accuracy dashed.
  const width = 560;
  const height = 200;
  const left = 40;
  const bottom = 24;
  const plotW = width - left - 12;
  const plotH = height - bottom - 10;
  const box = svg("svg", {
    class: "curve",
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    "data-points": points.length,
    role: "img",
  });
  const y = (a) => 10 + (1 - a) * plotH;
  const first = points.length ? points[0][0] : 0;
  const last = points.length ? points[points.length - 1][0] : 1;
  const x = (v) => left + ((v - first) / (last - first || 1)) * plotW;
  box.append(svg("rect", { x: left, y: 10, width: plotW, height: plotH, class: "frame" }));
  for (const tick of [0, 0.5, 1]) {
    box.append(svg("line", { x1: left, x2: left + plotW, y1: y(tick), y2: y(tick), class: "grid" }));
    const label = svg("text", { x: left - 6, y: y(tick) + 4, "text-anchor": "end" });
    label.textContent = tick.toFixed(1);
    box.append(label);
  }
  if (num(target) !== null) {
    box.append(svg("line", { x1: left, x2: left + plotW, y1: y(target), y2: y(target), class: "target" }));
  }
  for (const [value, anchor] of [
    [first, "start"],
    [last, "end"],
  ]) {
    const label = svg("text", { x: x(value), y: height - 6, "text-anchor": anchor });
    label.textContent = `v${value}`;
    box.append(label);
  }
  if (points.length) {
    const coords = points.map(([v, a]) => `${x(v).toFixed(1)},${y(a).toFixed(1)}`).join(" ");
    box.append(svg("polyline", { points: coords, class: "line" }));
    const [v, a] = points[points.length - 1];
    box.append(svg("circle", { cx: x(v), cy: y(a), r: 3, class: "dot" }));
  }
  return box;
}

function renderJobs(now) {
  const holder = document.getElementById("jobs");
  const views = [...fleet.jobs.values()].filter((j) => j.state);
  views.sort((a, b) => {
    const done = TERMINAL.has(a.state.phase) - TERMINAL.has(b.state.phase);
    return done || (num(b.state.submitted) || 0) - (num(a.state.submitted) || 0);
  });
  const cards = views.map((view) => {
    const s = view.state;
    const points = [...view.accuracy.entries()].sort((a, b) => a[0] - b[0]);
    const metrics = s.metrics && typeof s.metrics === "object" ? s.metrics : {};
    const done = progressOf(view, now);
    const trainers = s.trainers && typeof s.trainers === "object" ? s.trainers : {};
    const total = Object.entries(trainers)
      .filter(([k, v]) => k !== "standby" && Number.isInteger(v))
      .reduce((sum, [, v]) => sum + v, 0);
    const stragglers = Array.isArray(s.stragglers) ? s.stragglers.filter((x) => typeof x === "string") : [];
    const facts = [
      ["version", s.model_version],
      ["updates", s.updates_applied],
      ["accuracy", num(metrics.accuracy) === null ? "" : metrics.accuracy.toFixed(4)],
      ["trainers", `${trainers.running || 0}/${total}`],
      ["stop", stopRules(s.stop)],
    ];
    if (stragglers.length) facts.push(["stragglers", stragglers.join(", ")]);
    return el(
      "section",
      { class: `job phase-${s.phase}`, "data-job": view.id },
      el(
        "h3",
        {},
        el("span", { class: "name" }, view.id),
        el("span", { class: "phase" }, s.phase || ""),
        sparkline(points),
      ),
      el(
        "div",
        { class: "bar" },
        el("progress", { max: "1", value: String(done) }),
        el("span", { class: "pct" }, `${Math.round(done * 100)}%`),
        el("span", { class: "reason" }, s.reason || ""),
      ),
      el("dl", {}, ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-fact": k }, v)])),
      curve(points, s.stop ? s.stop.target_accuracy : null),
    );
  });
  if (!cards.length) cards.push(el("p", { class: "empty" }, "no jobs yet"));
  holder.replaceChildren(...cards);
  return views;
}

function render() {
  pending = null;
  const now = Date.now() / 1000;
  renderAgents();
  const views = renderJobs(now);
  const agents = [...fleet.agents.values()].filter((a) => a.status);
  const online = agents.filter((a) => a.status.state === "online").length;
  const running = views.filter((j) => j.state.phase === "running").length;
  document.getElementById("summary").textContent =
    `agents ${online}/${agents.length} online · jobs ${running} running/${views.length}`;
}

function scheduleRender() {
  if (pending === null) pending = setTimeout(render, 200);
}

function showState(state, detail) {
  const conn = document.getElementById("conn");
  conn.dataset.state = state;
  conn.textContent = state === "connected" ? "connected" : `${state}: ${detail}`;
  document.getElementById("login").hidden = state !== "refused";
}

// -- start ---------------------------------------------------------------------------------------

function start(config, credentials = {}) {
  if (client) client.close();
  prefix = config.prefix;
  document.getElementById("source").textContent = `${config.ws_url} · ${config.prefix}`;
  if (!config.ws_url) {
    showState("error", "no broker WebSocket URL: add ?broker=ws://host:port to the address");
    return;
  }
  client = new MqttWsClient(config.ws_url, { ...credentials, onMessage, onState: showState });
  for (const leaf of ["status", "info", "roles"]) client.subscribe(`${prefix}/agents/+/${leaf}`, 1);
  client.subscribe(`${prefix}/agents/+/telemetry`, 0);
  client.subscribe(`${prefix}/jobs/+/state`, 1);
  client.subscribe(`${prefix}/jobs/+/metrics/+`, 0);
  client.subscribe(`${prefix}/jobs/+/agents/+/progress`, 1);
  client.connect();
}

loadConfig().then((config) => {
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    start(config, { username: form.username.value, password: form.password.value });
  });
  start(config);
  render();
  setInterval(render, 1000); // progress towards a time limit moves between documents
});
