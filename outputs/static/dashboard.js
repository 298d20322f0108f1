// The supervisors' page (outputs/dashboard.py). A file of its own: the Content-Security-Policy allows no inline
// script. Snapshots come once a second over server-sent events; the selected conversation's timeline is fetched
// incrementally: only the turns changed since the newest change the page has (?after=<seq>), and only when the
// snapshot says it changed.
"use strict";
const POSITIVE_HINTS = ["joy", "joyful", "happy", "excited", "peaceful", "powerful"];
let selected = null;  // [tenant, conversation_id]
let source = null;
// The selected conversation's timeline as the page has it: turns in the server's order, `seq` the newest change.
let timeline = {key: null, seq: null, turns: []};
let loading = false, reload = false;  // one timeline request at a time; `reload`: ask again when it is back

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}
function tone(label, negative) {
  if (negative) return "negative";
  return POSITIVE_HINTS.includes(String(label).toLowerCase()) ? "positive" : "";
}
function convKey(tenant, id) { return `${tenant ?? "-"}/${id}`; }

function renderConversations(list) {
  const body = document.getElementById("conversations");
  body.replaceChildren(...list.map(c => {
    const row = el("tr", {class: "conv", "data-key": convKey(c.tenant, c.conversation_id)},
      el("td", {}, c.conversation_id), el("td", {}, c.tenant ?? "–"),
      el("td", {class: "risk" + (c.negative_streak >= 3 ? " high" : "")}, String(c.negative_streak)),
      el("td", {}, `${Math.round(100 * c.recent_negative_share)} %`), el("td", {}, String(c.turns)),
      el("td", {}, `${c.last_label ?? ""}${c.last_role ? " (" + c.last_role + ")" : ""}`));
    if (selected && convKey(...selected) === convKey(c.tenant, c.conversation_id)) row.classList.add("selected");
    row.onclick = () => select(c.tenant, c.conversation_id);
    return row;
  }));
}

async function select(tenant, id) {
  selected = [tenant, id];
  await loadTimeline();
}

function conversationUrl(tenant, id) {
  return `/api/conversations/${encodeURIComponent(tenant ?? "-")}/${encodeURIComponent(id)}`;
}

async function loadTimeline() {
  if (!selected) return;
  if (loading) { reload = true; return; }
  loading = true;
  try {
    do {
      reload = false;
      await fetchTimeline();
    } while (reload);
  } catch (e) {
    // the network failed: the next snapshot asks again
  } finally {
    loading = false;
  }
}

async function fetchTimeline() {
  const [tenant, id] = selected;
  const key = convKey(tenant, id);
  if (timeline.key !== key) timeline = {key, seq: null, turns: []};
  const after = timeline.seq === null ? "" : `?after=${timeline.seq}`;
  const r = await fetch(conversationUrl(tenant, id) + after, {credentials: "same-origin"});
  if (!r.ok || timeline.key !== key) return;
  const c = await r.json();
  for (const t of c.turns) {  // a turn seen before (its text came later) is replaced where it is
    const i = timeline.turns.findIndex(x => x.id === t.id);
    if (i >= 0) timeline.turns[i] = t; else timeline.turns.push(t);
  }
  timeline.turns = timeline.turns.slice(-c.kept);  // the server's timeline keeps the newest `kept` turns
  const changed = timeline.seq === null || c.turns.length > 0;
  timeline.seq = c.seq;
  if (changed) renderTimeline(c);
}

function renderTimeline(c) {
  document.getElementById("timeline-title").textContent = `Timeline · ${c.conversation_id}` + (c.tenant ? ` · ${c.tenant}` : "");
  const box = document.getElementById("timeline");
  box.classList.remove("muted");
  box.replaceChildren(...timeline.turns.map(t => el("div", {class: `turn ${tone(t.label, t.negative)}`, "data-message": t.message_id},
    el("span", {class: "muted"}, `#${t.turn}`),
    el("span", {}, t.role ?? t.speaker),
    el("span", {}, el("span", {class: "label"}, t.label), ` ${Math.round(100 * t.probability)} %`,
       t.degraded ? el("span", {class: "muted"}, " · partial context") : ""),
    ...(t.text != null ? [el("span", {class: "text"}, t.text)] : []))));
  box.scrollTop = box.scrollHeight;
}

function renderAlerts(alerts) {
  const feed = document.getElementById("alert-feed");
  if (!alerts.length) return;
  feed.classList.remove("muted");
  feed.replaceChildren(...alerts.map(a => {
    const head = a.conversation_id
      ? el("a", {href: "#", onclick: (ev) => { ev.preventDefault(); select(a.tenant, a.conversation_id); }}, a.summary)
      : el("span", {}, a.summary);
    return el("div", {class: `alert ${a.severity}`, "data-alert": a.alert_id},
      el("div", {}, el("b", {}, a.rule), " · ", a.tenant ?? "–", " · ", new Date(a.raised_at).toLocaleTimeString()),
      el("div", {}, head),
      el("div", {class: "evidence"}, ...a.evidence.map(x => el("div", {class: "evidence-item"},
        `#${x.turn} ${x.speaker}: ${x.label} ${Math.round(100 * x.probability)} %`))));
  }));
}

function renderRates(rates) {
  const box = document.getElementById("rates");
  box.replaceChildren(...Object.entries(rates).map(([tenant, series]) => {
    const w = 300, h = 48, n = Math.max(series.length, 2);
    const pts = series.map((b, i) => `${(i / (n - 1)) * w},${h - b.negative_rate * (h - 4) - 2}`).join(" ");
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`); svg.setAttribute("class", "rate"); svg.setAttribute("preserveAspectRatio", "none");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts); line.setAttribute("fill", "none"); line.setAttribute("stroke", "#c0392b"); line.setAttribute("stroke-width", "2");
    svg.append(line);
    const last = series[series.length - 1];
    return el("div", {}, el("div", {}, `${tenant}: ${last ? Math.round(100 * last.negative_rate) : 0} % negative in the last minute`), svg);
  }));
}

function render(s) {
  document.getElementById("eps").textContent = s.health.events_per_s;
  document.getElementById("events").textContent = s.health.events;
  document.getElementById("alerts").textContent = s.health.alerts;
  document.getElementById("lag").textContent = s.health.consumer_lag ?? "–";
  document.getElementById("adapters").textContent =
    Object.entries(s.health.adapters).map(([k, v]) => v ? `${k}@${v}` : k).join(", ") || "–";
  const sel = document.getElementById("tenant");
  const known = new Set([...sel.options].map(o => o.value));
  for (const t of s.tenants) if (!known.has(t)) sel.append(el("option", {value: t}, t));
  renderConversations(s.conversations);
  renderAlerts(s.alerts);
  renderRates(s.negative_rate);
  if (selected) {  // the timeline only when the snapshot says it changed (or the conversation is not in it)
    const shown = s.conversations.find(c => convKey(c.tenant, c.conversation_id) === convKey(...selected));
    if (!shown || timeline.key !== convKey(...selected) || shown.seq !== timeline.seq) loadTimeline();
  }
}

function connect() {
  if (source) source.close();
  const tenant = document.getElementById("tenant").value;
  source = new EventSource("/api/events" + (tenant ? `?tenant=${encodeURIComponent(tenant)}` : ""));
  source.onmessage = (m) => { document.getElementById("error").textContent = ""; render(JSON.parse(m.data)); };
  source.onerror = () => { document.getElementById("error").textContent = "reconnecting…"; };
}
document.getElementById("tenant").onchange = connect;
connect();
