// The live ops page: uPlot charts fed by /api/series every second, tables by /api/recent.
"use strict";

const CHARTS = {
  throughput: [["ingest_accepted_per_s", "ingest accepted", "#1565c0"],
               ["features_applied_per_s", "features applied", "#2e7d32"],
               ["predictions_per_s", "predictions", "#6a1b9a"]],
  lag: [["lag_messages", "messages", "#ef6c00"]],
  freshness: [["freshness_p50_ms", "p50", "#2e7d32"], ["freshness_p99_ms", "p99", "#c62828"]],
  latency: [["Predict_p50_ms", "Predict p50", "#90caf9"], ["Predict_p99_ms", "Predict p99", "#1565c0"],
            ["ingest_http_p50_ms", "ingest p50", "#a5d6a7"], ["ingest_http_p99_ms", "ingest p99", "#2e7d32"],
            ["governance_decide_p99_ms", "decide p99", "#8e24aa"]],
  errors: [["ingest_rejected_per_s", "dead-lettered (ingest)", "#c62828"],
           ["features_late_per_s", "late (features)", "#ef6c00"]],
  governance: [["decisions_per_s", "decisions/s", "#1565c0"], ["denials_per_s", "denials/s", "#c62828"],
               ["drift_score", "drift score (max)", "#6d4c41"]],
};
const plots = {};

function makePlot(id, series) {
  const el = document.getElementById(id);
  const opts = {
    width: Math.max(el.clientWidth, 520), height: 200,
    series: [{}, ...series.map(([, label, stroke]) => ({ label, stroke, width: 2, spanGaps: true }))],
    axes: [{}, { size: 60 }],
  };
  const data = [[], ...series.map(() => [])];
  plots[id] = new uPlot(opts, data, el);
}

function update(payload) {
  for (const [id, series] of Object.entries(CHARTS)) {
    const data = [payload.t, ...series.map(([key]) => payload.series[key] || payload.t.map(() => null))];
    plots[id].setData(data);
    const points = data.slice(1).reduce((n, col) => n + col.filter((v) => v !== null).length, 0);
    document.getElementById(id).dataset.points = String(points);
  }
  const body = document.body;
  body.dataset.updates = String(Number(body.dataset.updates) + 1);
}

function services(health, unreachable) {
  const parts = Object.entries(health).map(([name, h]) =>
    `<span class="${h.ready ? "ok" : "bad"}">${name}${h.ready ? "" : " (not ready)"}</span>`);
  for (const name of unreachable) parts.push(`<span class="bad">${name} (no answer)</span>`);
  document.getElementById("services").innerHTML = parts.join(" · ");
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function table(id, rows, columns) {
  const el = document.getElementById(id);
  el.dataset.rows = String(rows.length);
  if (!rows.length) { el.className = "empty"; el.textContent = "none"; return; }
  el.className = "";
  const head = columns.map((c) => `<th>${c}</th>`).join("");
  const body = rows.map((r) => "<tr>" + columns.map((c) => {
    const v = c === "ts_ms" ? new Date(r[c]).toISOString().slice(11, 19) : r[c];
    return `<td>${escapeHtml(Array.isArray(v) ? v.join("; ") : v)}</td>`;
  }).join("") + "</tr>").join("");
  el.innerHTML = `<table><tr>${head}</tr>${body}</table>`;
}

async function tick() {
  try {
    const r = await fetch("api/series");
    const payload = await r.json();
    update(payload);
    services(payload.health, payload.unreachable);
  } catch (e) { document.getElementById("services").textContent = "ops endpoint unreachable: " + e; }
}

async function recent() {
  try {
    const r = await fetch("api/recent");
    const payload = await r.json();
    table("dead_letters", payload.dead_letters, ["ts_ms", "reason", "message", "producer_id"]);
    table("denials", payload.denials, ["ts_ms", "action", "subject", "reasons"]);
  } catch (e) { /* shown by the next tick */ }
}

for (const [id, series] of Object.entries(CHARTS)) makePlot(id, series);
tick(); recent();
setInterval(tick, 1000);
setInterval(recent, 5000);
