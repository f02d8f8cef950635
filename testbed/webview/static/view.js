// The testbed's view of runs: plain SVG and HTML, no library, no build step.
// Data: inline (a report: <script id="data">), or from the server: `api/stream` sends the
// whole state, then what is new, then `end` (testbed/webview/server.py). The state's
// format is described in docs/live.md; the page only reads it.
"use strict";
(function () {
  const TABLES = ["tokens", "events", "placements", "telemetry", "links"];
  const DEVICE_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
    "#a6761d", "#1f78b4", "#b2182b", "#666666"];
  const RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22"];
  const TOKEN = new URLSearchParams(location.search).get("token");
  const S = {
    mode: "", note: "", finished: false, runs: [], token: 0, follow: true, hidden: new Set(),
    ended: false, lost: false, pending: false, devices: [],
  };

  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  // Markup is built only by the template tag `h`, which escapes every value put into it
  // (text or attribute) unless the value is itself markup `h` built (an Html, or an array
  // of them); `setHtml`, the one place that assigns innerHTML, takes nothing else. So no
  // string from a run's files (names, statuses, cells, summaries) ever becomes markup;
  // tests/test_webview.py holds view.js to this.
  class Html { constructor(s) { this.s = s; } }
  const piece = (v) => (v instanceof Html ? v.s : Array.isArray(v) ? v.map(piece).join("") : esc(v));
  const h = (strings, ...values) => new Html(strings.reduce((out, str, i) => out + piece(values[i - 1]) + str));
  function setHtml(el, html) {
    if (!(html instanceof Html)) throw new TypeError("setHtml: markup must be built by h``");
    el.innerHTML = html.s;
  }
  const api = (path) => (TOKEN ? `${path}?token=${encodeURIComponent(TOKEN)}` : path);
  const num = (x) => (typeof x === "number" && isFinite(x) ? x : null);
  const fmt = (x, d = 2) => (num(x) === null ? "-" : x.toFixed(d));
  const mib = (b) => (num(b) === null ? "-" : (b / 1048576).toFixed(b < 10485760 ? 2 : 0));

  // ------------------------------------------------------------------ state

  function objects(columns, rows) {
    const out = [];
    for (const r of rows || []) {
      const o = {};
      for (let i = 0; i < columns.length; i++) o[columns[i]] = r[i];
      out.push(o);
    }
    return out;
  }

  function newRun(j) {
    const run = { id: j.id, label: j.label, path: j.path, meta: {}, summary: null, columns: j.columns || {} };
    for (const t of TABLES) run[t] = [];
    merge(run, j);
    return run;
  }

  function merge(run, j) {
    if (j.meta !== undefined) { run.meta = j.meta || {}; run.summary = j.summary; }
    for (const t of TABLES) {
      for (const o of objects(run.columns[t] || [], (j.rows || {})[t])) run[t].push(o);
    }
    run.status = j.status;
    run.token = j.token;
  }

  function applyState(st) {
    S.mode = st.mode; S.note = st.note; S.finished = st.finished;
    S.runs = st.runs.map(newRun);
    if (S.mode !== "live") S.token = maxToken();
    schedule();
  }

  function applyUpdate(u) {
    S.note = u.note; S.finished = u.finished;
    for (const part of u.runs) {
      const run = S.runs[part.index];
      if (run && run.id === part.id) merge(run, part);
      else S.runs[part.index] = newRun(part);
    }
    schedule();
  }

  function connect() {
    const inline = $("data");
    if (inline) { applyState(JSON.parse(inline.textContent)); return; }
    const es = new EventSource(api("api/stream"));
    es.addEventListener("state", (e) => { S.lost = false; applyState(JSON.parse(e.data)); });
    es.addEventListener("update", (e) => applyUpdate(JSON.parse(e.data)));
    es.addEventListener("end", () => { S.ended = true; es.close(); schedule(); });
    es.onerror = () => {
      if (S.ended) return;
      // the run ended and its server with it, or a network hiccup: keep what we have
      S.lost = true; es.close(); schedule();
    };
  }

  // ------------------------------------------------------------------ derived

  const visible = () => S.runs.map((r, i) => [r, i]).filter(([r]) => !S.hidden.has(r.id));
  const newTokens = (r) => ((r.meta.scenario || {}).generation || {}).new_tokens;

  function maxToken() {
    let m = 0;
    for (const r of S.runs) if (num(r.token) !== null) m = Math.max(m, r.token);
    return m;
  }

  function deviceColors() {
    for (const r of S.runs) {
      const names = ((r.meta.scenario || {}).devices || []).map((d) => d.name);
      for (const p of r.placements) names.push(p.device);
      for (const n of names) if (n && !S.devices.includes(n)) S.devices.push(n);
    }
    const out = {};
    S.devices.forEach((n, i) => { out[n] = DEVICE_COLORS[i % DEVICE_COLORS.length]; });
    return out;
  }

  function placementAt(run, k) {
    const m = new Map();
    for (const p of run.placements) if (p.token <= k) m.set(p.block, p.device);
    return m;
  }

  function latestBy(rows, k, key) {
    const m = new Map();
    for (const r of rows) if (r.token <= k) m.set(key(r), r);
    return m;
  }

  function scenarioEvents(run) {
    const actions = new Set(((run.meta.scenario || {}).events || []).map((e) => e.action));
    return run.events.filter((e) => actions.has(e.kind));
  }

  function eventLabel(e) {
    const d = String(e.detail || "");
    if (e.kind === "set_link") return `link ${e.subject}: ${d}`;
    if (e.kind === "fail_device") return `${e.subject} fails`;
    if (e.kind === "join_device") return `${e.subject} joins`;
    return `${e.kind} ${e.subject}${d ? ": " + d : ""}`;
  }

  function statusText(r) {
    const st = String(r.status || "starting");
    if (st === "running" && S.mode !== "live") return "ended without a summary (crashed or killed)";
    return st;
  }

  // ------------------------------------------------------------------ drawing

  // While a run goes on, updates arrive four times a second; drawing at most twice a
  // second halves what watching costs the machine (the run may share it) and still follows.
  const LIVE_DRAW_MS = 500;
  let lastDraw = 0;

  function schedule() {
    if (S.pending) return;
    S.pending = true;
    const live = S.mode === "live" && !S.finished && !S.ended;
    const wait = live ? Math.max(0, lastDraw + LIVE_DRAW_MS - performance.now()) : 0;
    const go = () => { S.pending = false; lastDraw = performance.now(); draw(); };
    setTimeout(() => (document.hidden ? go() : requestAnimationFrame(go)), wait);
  }

  function draw() {
    const top = maxToken();
    const slider = $("slider");
    slider.max = String(top);
    const live = S.mode === "live" && !S.finished && !S.ended && !S.lost;
    $("follow-box").hidden = S.mode !== "live";
    if (S.mode === "live" && $("follow").checked) S.token = top;
    S.token = Math.min(S.token, top);
    slider.value = String(S.token);
    $("token-label").textContent = String(S.token);
    const colors = deviceColors();
    drawHeader(live);
    drawToggles();
    drawLatency();
    drawCards(colors);
  }

  function drawHeader(live) {
    const r0 = S.runs[0];
    const scen = r0 ? (r0.meta.scenario || {}) : {};
    const names = [...new Set(S.runs.map((r) => (r.meta.scenario || {}).name).filter(Boolean))];
    $("title").textContent = names.length > 1 ? `${names.length} scenarios: ${names.join(", ")}` : scen.name || "edge-llm testbed";
    document.title = `${names.length > 1 ? "runs" : scen.name || "testbed"} · ${S.mode || "view"}`;
    const m = r0 ? r0.meta : {};
    $("subtitle").textContent = r0
      ? `${(scen.model || {}).preset || (scen.model || {}).gguf || "model"}, ${(scen.devices || []).length} devices, ` +
        `${newTokens(r0) || "?"} tokens, seed ${m.seed}, ${m.clock || "?"} clock` +
        (m.time_scale ? `, time scale ${m.time_scale}` : "")
      : "";
    let text;
    if (!S.runs.length) text = S.note || (S.lost ? "no connection to the run" : "waiting for the run...");
    else if (S.mode === "live") {
      const cur = S.runs[S.runs.length - 1];
      const where = cur.token === null || cur.token === undefined ? "starting" : `token ${cur.token + 1} of ${newTokens(cur) || "?"}`;
      if (live) text = `live · ${cur.label || cur.meta.algorithm}: ${cur.status === "running" ? where : statusText(cur)}`;
      else if (S.lost) text = "connection lost (the run ended, or its server stopped): showing what arrived; reload to reconnect";
      else text = "run finished";
      if (S.note && live) text += ` · ${S.note}`;
    } else text = `${S.runs.length} run${S.runs.length > 1 ? "s" : ""}${S.mode === "report" ? " (report)" : ""}`;
    const st = $("status");
    st.textContent = text;
    st.className = "status " + (live ? "live" : S.lost ? "lost" : "");
    $("footer").textContent = S.runs.map((r) => r.path).filter(Boolean).join(" · ");
  }

  function drawToggles() {
    const box = $("runs-toggle");
    const key = S.runs.map((r) => r.id + (S.hidden.has(r.id) ? "-" : "+")).join(",");
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    setHtml(box, S.runs.length < 2 ? h`` : h`${S.runs.map((r, i) => [
      h`<label class="toggle"><input type="checkbox" data-run="${r.id}"${S.hidden.has(r.id) ? h`` : h` checked`}>`,
      h`<span class="swatch" style="background:${RUN_COLORS[i % RUN_COLORS.length]}"></span>${r.label || r.meta.algorithm || r.id}</label> `])}`);
  }

  function niceTicks(lo, hi, n) {
    const span = hi - lo || 1;
    const step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || mag * 10;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  function quantile(xs, q) {
    if (!xs.length) return 0;
    const s = xs.slice().sort((a, b) => a - b);
    return s[Math.min(s.length - 1, Math.floor(q * (s.length - 1)))];
  }

  function drawLatency() {
    const svg = $("latency");
    // drawn at the element's own width, so that text is never stretched
    const W = Math.max(400, Math.round(svg.getBoundingClientRect().width) || 960), H = 300, L = 56, R = 14, T = 22, B = 30;
    const runs = visible();
    const key = [W, S.token, ...runs.map(([r, i]) => `${i}:${r.tokens.length}:${r.events.length}:${r.status}`)].join("|");
    if (svg.dataset.key === key) return;
    svg.dataset.key = key;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    let n = 1;
    const ys = [];
    for (const [r] of runs) {
      n = Math.max(n, newTokens(r) || 0, r.token || 0);
      for (const t of r.tokens) if (t.phase !== "prefill") {
        if (num(t.latency_ms) !== null) ys.push(t.latency_ms);
        if (num(t.predicted_ms) !== null) ys.push(t.predicted_ms);
      }
    }
    // a migration stall can be ten times a token: cut the axis above the bulk, mark the rest
    const top = ys.length ? Math.max(...ys) : 1, p95 = quantile(ys, 0.95);
    const ymax = top > 2.5 * p95 && p95 > 0 ? 1.6 * p95 : top * 1.08 || 1;
    const x = (k) => L + (W - L - R) * (k - 1) / Math.max(1, n - 1);
    const y = (v) => T + (H - T - B) * (1 - Math.min(v, ymax) / ymax);
    const parts = [];
    for (const v of niceTicks(0, ymax, 5)) {
      parts.push(h`<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/>`,
        h`<text class="tick" x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${v}</text>`);
    }
    for (const v of niceTicks(1, n, 8)) {
      if (v < 1 || v !== Math.round(v)) continue;
      parts.push(h`<text class="tick" x="${x(v)}" y="${H - B + 16}" text-anchor="middle">${v}</text>`);
    }
    parts.push(h`<text class="axis" x="12" y="${T + (H - T - B) / 2}" transform="rotate(-90 12 ${T + (H - T - B) / 2})" text-anchor="middle">ms</text>`,
      h`<line class="axisline" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`);
    const seen = new Set();
    let lane = 0;
    for (const [r] of runs) for (const e of scenarioEvents(r)) {
      const label = eventLabel(e), key = `${e.token}|${label}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const ex = x(Math.max(1, e.token - 0.5));
      parts.push(h`<line class="event" x1="${ex}" x2="${ex}" y1="${T}" y2="${H - B}"><title>${label}</title></line>`,
        h`<text class="event-label" x="${ex + 4}" y="${T - 8 + 12 * (lane++ % 2)}">${label}</text>`);
    }
    let points = 0;
    const prefill = [];
    for (const [r, i] of runs) {
      const c = RUN_COLORS[i % RUN_COLORS.length];
      const dec = r.tokens.filter((t) => t.phase !== "prefill" && num(t.latency_ms) !== null);
      const pre = r.tokens.find((t) => t.phase === "prefill");
      if (pre) prefill.push(`${r.label || r.meta.algorithm}: ${fmt(pre.latency_ms)} ms`);
      points += dec.length;
      const line = (key) => dec.filter((t) => num(t[key]) !== null).map((t) => `${x(t.token).toFixed(1)},${y(t[key]).toFixed(1)}`).join(" ");
      parts.push(h`<polyline class="pred" stroke="${c}" points="${line("predicted_ms")}"/>`,
        h`<polyline class="lat" stroke="${c}" data-run="${i}" points="${line("latency_ms")}"/>`);
      for (const t of dec) {
        if (t.latency_ms > ymax) {
          parts.push(h`<path class="cut" fill="${c}" d="M${x(t.token) - 4},${T + 6}l4,-6l4,6z"><title>token ${t.token}: ${fmt(t.latency_ms)} ms</title></path>`,
            h`<text class="cut-label" x="${x(t.token) + 5}" y="${T + 6}">${fmt(t.latency_ms, 0)}</text>`);
        }
        if (t.migrations > 0) {
          const cx = x(t.token), cy = y(t.latency_ms);
          parts.push(h`<path class="migr" fill="${c}" d="M${cx},${cy - 5}l5,5l-5,5l-5,-5z"><title>token ${t.token}: ${t.migrations} migration(s), ${mib(t.migrated_bytes)} MiB, stall ${fmt(t.stall_ms)} ms</title></path>`);
        }
      }
      const last = dec[dec.length - 1];
      if (last && String(r.status).startsWith("failed")) {
        parts.push(h`<text class="fail" x="${x(last.token)}" y="${y(last.latency_ms) + 5}" fill="${c}" text-anchor="middle">✕<title>${r.status}</title></text>`);
      }
    }
    const cx = x(Math.max(1, S.token));
    parts.push(h`<line class="cursor" x1="${cx}" x2="${cx}" y1="${T}" y2="${H - B}"/>`);
    setHtml(svg, h`${parts}`);
    svg.dataset.points = String(points);
    svg.dataset.ymax = ymax.toFixed(3);
    $("latency-note").textContent = (prefill.length ? `prefill (token 0, not drawn): ${prefill.join(", ")}. ` : "") +
      (top > ymax ? `Axis cut at ${fmt(ymax, 1)} ms; taller tokens are marked at the top with their latency.` : "");
  }

  // how many of `rows` are at or before token k (rows arrive in token order)
  function upto(rows, k) {
    let n = rows.length;
    while (n > 0 && rows[n - 1].token > k) n--;
    return n;
  }

  function drawCards(colors) {
    const box = $("cards");
    const runs = visible();
    // one card per run, kept across updates; each part of it is redrawn only when what it
    // shows changed (during a run that is mostly the memory: the placement, links and
    // events change at a few tokens only)
    for (const el of Array.from(box.children)) if (!runs.some(([r]) => r.id === el.dataset.run)) el.remove();
    runs.forEach(([r, i]) => {
      let card = box.querySelector(`[data-run="${CSS.escape(r.id)}"]`);
      if (!card) {
        card = document.createElement("article");
        card.className = "card";
        card.dataset.run = r.id;
        setHtml(card, h`${[h`<div class="part head"></div><div class="row"><div><h4>Placement at token <span class="k-at"></span></h4>`,
          h`<div class="part placement-box"></div></div><div class="grow"><h4>Memory</h4><div class="part memory"></div>`,
          h`<h4>Links</h4><div class="part links-box"></div></div></div><h4>Events up to token <span class="k-at"></span></h4>`,
          h`<div class="part events-box"></div>`]}`);
        box.appendChild(card);
      }
      const k = Math.min(S.token, num(r.token) === null ? 0 : r.token);
      const ndev = Object.keys(colors).length;
      for (const el of card.querySelectorAll(".k-at")) el.textContent = String(k);
      part(card, ".head", [k, i, r.status, r.token, r.summary ? 1 : 0], () => headHtml(r, i, k));
      part(card, ".placement-box", [upto(r.placements, k), k === 0 || r.placements.some((p) => p.token === k), ndev],
        () => placementSvg(r, k, colors));
      part(card, ".memory", [upto(r.telemetry, k), ndev], () => memoryHtml(r, k, colors));
      part(card, ".links-box", [upto(r.links, k)], () => linksHtml(r, k));
      part(card, ".events-box", [upto(r.events, k)], () => eventsHtml(r, k));
    });
  }

  function part(card, selector, key, html) {
    const el = card.querySelector(selector);
    const k = key.join("|");
    if (el.dataset.key === k) return;
    el.dataset.key = k;
    setHtml(el, html());
  }

  function headHtml(r, i, k) {
    const c = RUN_COLORS[i % RUN_COLORS.length];
    const st = statusText(r);
    const cls = st === "completed" ? "ok" : st.startsWith("failed") || st.startsWith("ended") ? "bad" : "";
    const s = r.summary && r.summary.latency_ms ? r.summary.latency_ms : null;
    return h`${[
      h`<h3><span class="swatch" style="background:${c}"></span>${r.label || r.meta.algorithm || r.id}`,
      h` <span class="runstatus ${cls}">${st}</span></h3>`,
      h`<div class="muted small">token ${k} of ${num(r.token) === null ? "-" : r.token}`,
      s ? h` · mean ${fmt(s.mean)} ms, p95 ${fmt(s.p95)} ms, ${r.summary.migrations} migrations` : h``, h`</div>`,
      r.summary && r.summary.fidelity && r.summary.fidelity.distorted ? h`<div class="warn small">distorted: ${r.summary.fidelity.reason}</div>` : h``]}`;
  }

  function placementSvg(r, k, colors) {
    const at = placementAt(r, k);
    if (!at.size) return h`<p class="muted">no placement yet</p>`;
    let layers = 0, groups = 0;
    const cellOf = (b) => {
      const p = b.split(".");
      const l = parseInt(p[1], 10);
      if (p[0] === "head") return [l, parseInt(p[2], 10)];
      return [l, p[0] === "proj" ? -1 : -2];
    };
    for (const b of at.keys()) {
      const [l, g] = cellOf(b);
      if (!isNaN(l)) layers = Math.max(layers, l + 1);
      if (g >= 0) groups = Math.max(groups, g + 1);
    }
    const cs = Math.max(10, Math.min(22, Math.floor(300 / (groups + 2)))), gap = 2, left = 30, topm = 18;
    const colX = (g) => left + (g >= 0 ? g : groups + (g === -1 ? 0 : 1) + 0.3) * (cs + gap) + (g < 0 ? 6 : 0);
    const moved = new Set(r.placements.filter((p) => p.token === k && k > 0).map((p) => p.block));
    const w = colX(-2) + cs + 4, ht = topm + layers * (cs + gap) + 4;
    const parts = [];
    for (let g = 0; g < groups; g++) if (groups <= 16 || g % 2 === 0) parts.push(h`<text class="tick" x="${colX(g) + cs / 2}" y="12" text-anchor="middle">h${g}</text>`);
    parts.push(h`<text class="tick" x="${colX(-1) + cs / 2}" y="12" text-anchor="middle">proj</text>`,
      h`<text class="tick" x="${colX(-2) + cs / 2}" y="12" text-anchor="middle">ffn</text>`);
    for (let l = 0; l < layers; l++) parts.push(h`<text class="tick" x="${left - 4}" y="${topm + l * (cs + gap) + cs * 0.7}" text-anchor="end">L${l}</text>`);
    for (const [b, dev] of at) {
      const [l, g] = cellOf(b);
      if (isNaN(l)) continue;
      parts.push(h`<rect class="cell${moved.has(b) ? " moved" : ""}" data-block="${b}" data-device="${dev}" `,
        h`x="${colX(g)}" y="${topm + l * (cs + gap)}" width="${cs}" height="${cs}" fill="${colors[dev] || "#ccc"}"><title>${b} on ${dev}</title></rect>`);
    }
    const legend = S.devices.filter((d) => [...at.values()].includes(d) || ((r.meta.scenario || {}).devices || []).some((x) => x.name === d))
      .map((d) => h`<span class="legend"><span class="swatch" style="background:${colors[d]}"></span>${d}</span> `);
    return h`<svg class="placement" width="${w}" height="${ht}" viewBox="0 0 ${w} ${ht}">${parts}</svg><div class="small">${legend}</div>`;
  }

  function memoryHtml(r, k, colors) {
    const rows = latestBy(r.telemetry, k, (t) => t.device);
    if (!rows.size) return h`<p class="muted">no telemetry yet</p>`;
    const out = [];
    for (const [dev, t] of rows) {
      const max = t.mem_max || 1, pct = (b) => `${Math.max(0, 100 * (b || 0) / max).toFixed(3)}%`;
      const other = Math.max(0, (t.mem_current || 0) - (t.weights_bytes || 0) - (t.kv_bytes || 0) - (t.pressure_bytes || 0) - (t.reserved_bytes || 0));
      const seg = (cls, b, what) => (b > 0 ? h`<span class="seg ${cls}" style="width:${pct(b)}" title="${what}: ${mib(b)} MiB"></span>` : h``);
      out.push(h`<div class="mem" data-device="${dev}"><span class="name"><span class="swatch" style="background:${colors[dev] || "#ccc"}"></span>${dev}</span>`,
        h`<span class="bar">${seg("w", t.weights_bytes, "weights")}${seg("kv", t.kv_bytes, "K/V caches")}${seg("res", t.reserved_bytes, "reserved for migrations")}`,
        h`${seg("pr", t.pressure_bytes, "co-tenant")}${seg("oth", other, "other")}`,
        h`<span class="high" style="left:${pct(t.mem_high)}" title="high ${mib(t.mem_high)} MiB"></span></span>`,
        h`<span class="val${t.over_high ? " warn" : ""}">${mib(t.mem_current)} / ${mib(t.mem_high)} / ${mib(t.mem_max)} MiB</span></div>`);
    }
    return h`<div class="muted small">current / high / max; bar: weights, <span class="k kv">caches</span>, <span class="k pr">co-tenant</span>, tick at high</div>${out}`;
  }

  function linksHtml(r, k) {
    const rows = latestBy(r.links, k, (l) => `${l.src}>${l.dst}`);
    if (!rows.size) return h`<p class="muted">no link records yet</p>`;
    const first = latestBy(r.links, 0, (l) => `${l.src}>${l.dst}`);
    let top = 1;
    for (const l of rows.values()) top = Math.max(top, num(l.bandwidth_mbps) || 0, num(l.measured_mbps) || 0);
    const body = [...rows.values()].sort((a, b) => (a.src + a.dst < b.src + b.dst ? -1 : 1)).map((l) => {
      const was = first.get(`${l.src}>${l.dst}`);
      const changed = was && was.bandwidth_mbps !== l.bandwidth_mbps;
      const pct = (x) => (100 * (num(x) || 0) / top).toFixed(1);
      return [h`<tr class="${changed ? "changed" : ""}" data-link="${l.src}>${l.dst}"><td>${l.src} → ${l.dst}</td>`,
        h`<td class="num">${fmt(l.bandwidth_mbps, 1)}</td><td class="num">${fmt(l.measured_mbps, 1)}</td>`,
        h`<td><span class="rate"><span class="cfg" style="width:${pct(l.bandwidth_mbps)}%"></span>`,
        h`<span class="meas" style="width:${pct(l.measured_mbps)}%"></span></span></td>`,
        h`<td class="num">${fmt(l.latency_ms, 2)}</td></tr>`];
    });
    return h`<table class="links"><thead><tr><th>link</th><th>configured Mbit/s</th><th>measured</th><th></th><th>latency ms</th></tr></thead><tbody>${body}</tbody></table>`;
  }

  function eventsHtml(r, k) {
    const evs = r.events.filter((e) => e.token <= k);
    if (!evs.length) return h`<p class="muted">none</p>`;
    const shown = evs.slice(-8).reverse();
    return h`<ul class="events">${shown.map((e) => h`<li class="ev-${e.kind}"><span class="muted">token ${e.token}, ${fmt(e.t_s, 3)} s</span> <b>${e.kind}</b> ${e.subject} <span class="muted">${e.detail || ""}</span></li>`)}</ul>${
      evs.length > shown.length ? h`<div class="muted small">and ${evs.length - shown.length} earlier</div>` : h``}`;
  }

  // ------------------------------------------------------------------ controls

  $("slider").addEventListener("input", (e) => {
    S.token = parseInt(e.target.value, 10) || 0;
    if (S.mode === "live") $("follow").checked = S.token >= maxToken();
    schedule();
  });
  $("follow").addEventListener("change", () => schedule());
  $("runs-toggle").addEventListener("change", (e) => {
    const id = e.target.dataset.run;
    if (!id) return;
    if (e.target.checked) S.hidden.delete(id); else S.hidden.add(id);
    schedule();
  });

  window.addEventListener("resize", schedule);
  connect();
})();
