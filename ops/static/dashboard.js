// Cohort's live dashboard: polls the monitor's JSON every refresh_ms and redraws. No libraries.
"use strict";

(function () {
  const DATA_URL = location.pathname.replace(/\/+$/, "") + "/data";
  let refreshMs = 1000;
  let timer = null;
  window.cohortUpdates = 0;

  const $ = (id) => document.getElementById(id);

  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
  }
  const fmt = {
    int: (v) => num(v, 0),
    rate: (v) => num(v, 1),
    pct: (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%"),
    money: (v) => (v === null || v === undefined ? "–" : (Math.abs(v) < 1 ? Number(v).toFixed(5) : num(v, 2))),
    secs: (v) => (v === null || v === undefined ? "–" : (v < 1 ? (v * 1000).toFixed(0) + " ms" : v.toFixed(2) + " s")),
    ratio: (v) => num(v, 2),
  };

  function set(id, value, kind) {
    const el = $(id);
    if (!el) return;
    el.textContent = fmt[kind](value);
    el.dataset.raw = value === null || value === undefined ? "" : String(value);
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function drawChart(canvas, values, color) {
    const ctx = canvas.getContext("2d");
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    if (canvas.width !== w * ratio) { canvas.width = w * ratio; canvas.height = h * ratio; }
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const max = Math.max(1e-9, ...values);
    const pad = 18, bw = (w - pad) / Math.max(1, values.length);
    ctx.strokeStyle = "#263240";
    ctx.fillStyle = "#7f8c99";
    ctx.font = "11px sans-serif";
    ctx.beginPath(); ctx.moveTo(pad, 4.5); ctx.lineTo(w, 4.5); ctx.moveTo(pad, h - 0.5); ctx.lineTo(w, h - 0.5); ctx.stroke();
    ctx.fillText(max < 0.01 ? max.toExponential(1) : num(max, 2), 0, 12);
    ctx.fillStyle = color;
    values.forEach((v, i) => {
      const bh = (v / max) * (h - 8);
      ctx.fillRect(pad + i * bw, h - bh, Math.max(1, bw - 1), bh);
    });
  }

  function render(d) {
    const t = d.totals, live = d.live, lat = live.latency_s;
    set("throughput", live.throughput_rps, "rate");
    $("rate-window").textContent = live.window_s;
    set("requests", t.requests, "int");
    set("answered", t.answered, "int");
    set("failed", t.failed, "int");
    set("lat-p50", lat.p50, "secs");
    set("lat-p95", lat.p95, "secs");
    set("lat-p99", lat.p99, "secs");
    set("lat-avg", lat.avg, "secs");
    set("cost", t.cost, "money");
    set("cost-per-request", t.cost_per_request, "money");
    set("savings", t.savings, "money");
    set("savings-rate", t.savings_rate, "pct");
    set("baseline", t.baseline_cost, "money");
    set("calls-per-request", t.calls_per_request, "ratio");
    set("cache-rate", t.cache_hit_rate, "pct");
    set("coalesce-rate", t.coalescing_rate, "pct");
    set("error-rate", t.error_rate, "pct");
    $("live-error-rate").textContent = fmt.pct(live.error_rate);
    set("pending", d.queues.pending, "int");
    set("inference-queue", d.queues.inference, "int");

    const tbody = $("tiers").tBodies[0];
    tbody.replaceChildren();
    for (const tier of d.tiers) {
      const tr = document.createElement("tr");
      tr.dataset.tier = tier.name;
      cell(tr, tier.name);
      const state = tier.disabled ? "disabled" : tier.circuit;
      const pill = document.createElement("span");
      pill.className = "pill " + (tier.disabled ? "open" : tier.circuit);
      pill.textContent = state;
      cell(tr, "").appendChild(pill);
      cell(tr, fmt.int(tier.items), "num");
      cell(tr, fmt.pct(tier.share), "num");
      cell(tr, fmt.int(tier.calls), "num");
      cell(tr, fmt.int(tier.failed_calls), "num");
      cell(tr, fmt.money(tier.cost), "num");
      cell(tr, fmt.rate(tier.calls_per_s), "num");
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("div");
      fill.style.width = Math.min(100, tier.utilization * 100).toFixed(1) + "%";
      bar.title = num(tier.utilization, 2) + " calls in flight on average";
      bar.appendChild(fill);
      cell(tr, "").appendChild(bar);
      tbody.appendChild(tr);
    }

    const alerts = $("alerts");
    alerts.replaceChildren();
    $("alert-count").textContent = d.alerts.length;
    $("alert-count").className = "badge" + (d.alerts.length ? " hot" : "");
    if (!d.alerts.length) {
      const li = document.createElement("li"); li.className = "muted"; li.textContent = "none"; alerts.appendChild(li);
    }
    for (const a of d.alerts) {
      const li = document.createElement("li");
      li.dataset.alert = a.id;
      const sev = document.createElement("span");
      sev.className = "sev " + a.severity; sev.textContent = a.severity;
      li.appendChild(sev);
      li.appendChild(document.createTextNode(a.message));
      alerts.appendChild(li);
    }

    const errors = $("errors").tBodies[0];
    errors.replaceChildren();
    const codes = Object.entries(d.errors);
    if (!codes.length) { const tr = document.createElement("tr"); cell(tr, "none", "muted"); errors.appendChild(tr); }
    for (const [code, n] of codes) {
      const tr = document.createElement("tr"); cell(tr, code); cell(tr, fmt.int(n), "num"); errors.appendChild(tr);
    }

    const queues = $("queues").tBodies[0];
    queues.replaceChildren();
    const q = d.queues;
    for (const [label, key] of [["pending (not batched)", "pending"], ["  stream, unclaimed", "pending_unclaimed"],
                                ["  open pool", "open_pool"], ["inference queue", "inference"],
                                ["grouper queue", "grouper"], ["gpu queue", "gpu"], ["batches in flight", "inflight_batches"]]) {
      const tr = document.createElement("tr"); tr.dataset.queue = key;
      cell(tr, label); cell(tr, fmt.int(q[key]), "num"); queues.appendChild(tr);
    }

    drawChart($("chart-items"), d.series.map((r) => r.items), "#4aa3ff");
    drawChart($("chart-cost"), d.series.map((r) => r.cost), "#3ecf8e");

    if (d.flower_url) { const a = $("flower-link"); a.href = d.flower_url; a.hidden = false; }
    $("refresh").textContent = (d.refresh_ms / 1000).toString();
    $("updated").textContent = new Date(d.now * 1000).toLocaleTimeString();
  }

  async function poll() {
    try {
      const response = await fetch(DATA_URL, { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      render(data);
      window.cohortUpdates += 1;
      window.cohortLast = data;
      $("status-dot").className = "dot ok";
      $("status-text").textContent = "live";
      if (data.refresh_ms && data.refresh_ms !== refreshMs) refreshMs = data.refresh_ms;
    } catch (err) {
      $("status-dot").className = "dot bad";
      $("status-text").textContent = "disconnected (" + err.message + ")";
    }
    timer = setTimeout(poll, refreshMs);
  }

  document.addEventListener("DOMContentLoaded", poll);
})();
