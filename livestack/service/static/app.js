/* livestack viewer: plain JS, no dependencies, works offline.
 *
 * Wire protocol (see livestack/service/server.py):
 *   text:   {"v":1,"type":"hello"|"frame"|"stack"|"alert"|"gap"|"command_result", "data":..}
 *           the data of "frame", "stack" (state "running"|"paused"|"rebuilding") and "alert"
 *           are defined in livestack/service/events.py
 *   binary: 4-byte big-endian header length L, L bytes of JSON {"stack_id","version","mime"}, JPEG.
 */
"use strict";

(function () {
  const MAX_FRAMES = 500;
  const MAX_REJECTED_SHOWN = 200;
  const MAX_ALERTS = 4;
  const CHARTS = [
    { id: "chart-fwhm", get: (f) => f.metrics && f.metrics.fwhm_px, color: "#6fa8dc" },
    { id: "chart-stars", get: (f) => f.metrics && f.metrics.star_count, color: "#9fc5e8" },
    { id: "chart-background", get: (f) => f.metrics && f.metrics.background_adu, color: "#b4a7d6" },
    { id: "chart-weight", get: (f) => f.weight, color: "#93c47d" },
  ];

  const $ = (id) => document.getElementById(id);
  const el = {
    picker: $("stack-picker"), status: $("conn-status"), img: $("preview"), noImage: $("no-image"),
    viewport: $("viewport"), object: $("stack-object"), filter: $("stack-filter"),
    state: $("stack-state"), frames: $("stack-frames"), integration: $("stack-integration"),
    rejected: $("stack-rejected"), download: $("stack-download"),
    oObject: $("outreach-object"), oIntegration: $("outreach-integration"), oFrames: $("outreach-frames"),
    rejectedList: $("rejected-list"), rejectedCount: $("rejected-count"), alerts: $("alerts"),
    opPanel: $("operator-panel"), opToken: $("operator-token"), opFile: $("operator-file"),
    opResult: $("operator-result"),
  };

  const params = new URLSearchParams(location.search);
  const state = {
    stacks: new Map(),        // stack_id -> summary
    frames: new Map(),        // stack_id -> [frame, ...] oldest first
    previews: new Map(),      // stack_id -> {version, blob}
    current: params.get("stack") || sessionStorage.getItem("livestack.stack") || null,
    // Until the user picks a stack, follow each new stack (new target or filter). Stacks
    // already known do not steal the view, so filter-wheel cycling does not flip it.
    pinned: Boolean(params.get("stack") || sessionStorage.getItem("livestack.stack")),
    ws: null,
    runId: null,              // server run id from hello; previews are versioned per run
    retryMs: 500,
    commandId: 0,
    pending: new Map(),       // command id -> button
  };

  // ---------------------------------------------------------------- formatting

  function fmtDuration(seconds) {
    const s = Math.max(0, Math.round(Number(seconds) || 0));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const pad = (n) => String(n).padStart(2, "0");
    if (h > 0) return `${h}h ${pad(m)}m ${pad(r)}s`;
    if (m > 0) return `${m}m ${pad(r)}s`;
    return `${r}s`;
  }
  function integrationOf(s) {
    return s.total_exposure_s != null ? s.total_exposure_s : (s.exposure_s || 0);
  }
  function baseName(path) {
    return String(path || "").split(/[\\/]/).pop();
  }
  function stackLabel(s) {
    const parts = [s.object || s.stack_id];
    if (s.filter) parts.push(s.filter);
    if (s.sub_exposure_s) parts.push(`${s.sub_exposure_s}s`);
    const night = String(s.stack_id).split("/")[0];
    return `${parts.join(" · ")} (${s.frames || 0}) — ${night}`;
  }
  function apiStack(id) {
    return "/api/stacks/" + encodeURIComponent(id);  // one path segment: "/" -> %2F
  }

  // ---------------------------------------------------------------- stacks

  function upsertStack(summary) {
    if (!summary || !summary.stack_id) return;
    const old = state.stacks.get(summary.stack_id) || {};
    state.stacks.set(summary.stack_id, Object.assign({}, old, summary));
  }

  function renderPicker() {
    const ids = Array.from(state.stacks.keys());
    const sel = el.picker;
    const existing = Array.from(sel.options).map((o) => o.value);
    if (existing.join("\n") !== ids.join("\n")) {
      sel.textContent = "";
      for (const id of ids) {
        const opt = document.createElement("option");
        opt.value = id;
        sel.appendChild(opt);
      }
    }
    for (const opt of sel.options) opt.textContent = stackLabel(state.stacks.get(opt.value));
    if (state.current) sel.value = state.current;
  }

  function chooseDefaultStack() {
    if (state.current && state.stacks.has(state.current)) return;
    let best = null;
    for (const s of state.stacks.values()) {
      if (!best || String(s.updated || "") >= String(best.updated || "")) best = s;
    }
    if (best) selectStack(best.stack_id, false);
  }

  function selectStack(id, byUser) {
    if (!id) return;
    const changed = state.current !== id;
    state.current = id;
    if (byUser) {
      state.pinned = true;
      sessionStorage.setItem("livestack.stack", id);
    }
    renderPicker();
    renderSummary();
    if (changed) {
      const p = state.previews.get(id);
      if (p) showPreview(id, p.version, p.blob, true);
      else {
        el.img.classList.remove("loaded");
        el.noImage.hidden = false;
        const s = state.stacks.get(id);
        if (s && s.preview_version) loadPreviewOverHttp(id);  // a preview exists on the server
      }
      renderFramesDeferred();
    }
    loadFrames(id);
  }

  function renderSummary() {
    const s = state.stacks.get(state.current) || {};
    const object = s.object || (state.current ? state.current.split("/").pop() : "—");
    const frames = s.frames || 0;
    el.object.textContent = object;
    el.filter.textContent = s.filter || "";
    el.filter.hidden = !s.filter;
    el.state.textContent = s.state || "";
    el.state.dataset.state = s.state || "";
    el.frames.textContent = String(frames);
    el.integration.textContent = fmtDuration(integrationOf(s));
    el.rejected.textContent = String(s.rejected != null ? s.rejected : countRejected(state.current));
    el.oObject.textContent = object;
    el.oIntegration.textContent = fmtDuration(integrationOf(s));
    el.oFrames.textContent = String(frames);
    if (state.current) {
      el.download.href = apiStack(state.current) + "/stack.fits";
      el.download.hidden = false;
    }
    document.title = state.current ? `${object} · ${frames} frames — livestack` : "livestack";
  }

  async function loadFrames(id) {
    try {
      const resp = await fetch(apiStack(id), { cache: "no-store" });
      if (!resp.ok) return;
      const body = await resp.json();
      if (body.stack) upsertStack(body.stack);
      // Keep frames that arrived over the socket after the server built this list.
      const fetched = Array.isArray(body.frames) ? body.frames : [];
      const known = new Set(fetched.map((f) => f.file));
      const live = (state.frames.get(id) || []).filter((f) => !known.has(f.file));
      state.frames.set(id, fetched.concat(live).slice(-MAX_FRAMES));
      if (id === state.current) { renderSummary(); renderFramesDeferred(); }
    } catch (err) {
      // Offline or server restarting: the socket reconnect will retry.
    }
  }

  async function loadPreviewOverHttp(id) {
    try {
      const resp = await fetch(apiStack(id) + "/preview.jpg", { cache: "no-store" });
      if (!resp.ok) return;
      const version = Number(resp.headers.get("X-Preview-Version") || 0);
      const blob = await resp.blob();
      const have = state.previews.get(id);
      if (have && have.version >= version) return;
      state.previews.set(id, { version, blob });
      if (id === state.current) showPreview(id, version, blob, false);
    } catch (err) {
      // Best effort: the socket delivers the next preview anyway.
    }
  }

  // ---------------------------------------------------------------- frames, charts, rejected list

  function addFrame(frame) {
    const id = frame.stack_id;
    if (!id) return;
    let list = state.frames.get(id);
    if (!list) { list = []; state.frames.set(id, list); }
    list.push(frame);
    if (list.length > MAX_FRAMES) list.splice(0, list.length - MAX_FRAMES);
    if (!state.stacks.has(id)) {
      upsertStack({ stack_id: id });
      renderPicker();
      if (!state.pinned) selectStack(id, false);
    }
    if (id === state.current) renderFramesDeferred();
  }

  function countRejected(id) {
    return (state.frames.get(id) || []).filter((f) => f.verdict && f.verdict !== "accepted").length;
  }

  let framesQueued = false;
  function renderFramesDeferred() {
    if (framesQueued) return;
    framesQueued = true;
    requestAnimationFrame(() => { framesQueued = false; renderFrames(); });
  }

  function renderFrames() {
    const frames = state.frames.get(state.current) || [];
    for (const chart of CHARTS) drawChart($(chart.id), frames, chart);
    renderRejected(frames);
    document.dispatchEvent(new CustomEvent("livestack:frames", { detail: frames }));  // verdicts.js
    const s = state.stacks.get(state.current);
    if (!s || s.rejected == null) el.rejected.textContent = String(countRejected(state.current));
  }

  function renderRejected(frames) {
    const rejected = frames.filter((f) => f.verdict && f.verdict !== "accepted");
    const list = el.rejectedList;
    list.textContent = "";
    const shown = rejected.slice(-MAX_REJECTED_SHOWN).reverse();
    for (const f of shown) {
      const li = document.createElement("li");
      li.dataset.file = f.file || "";
      li.dataset.reason = f.reason || f.verdict;
      const file = document.createElement("span");
      file.className = "file";
      file.textContent = baseName(f.file);
      const reason = document.createElement("span");
      reason.className = "reason";
      reason.textContent = f.reason || f.verdict;
      const msg = document.createElement("span");
      msg.className = "message";
      msg.textContent = f.message ? " — " + f.message : "";
      li.append(file, reason, msg);
      li.title = "Select for the operator panel";
      li.addEventListener("click", () => { el.opFile.value = f.file || ""; });
      list.appendChild(li);
    }
    list.dataset.count = String(rejected.length);
    el.rejectedCount.textContent = String(rejected.length);
  }

  function niceNumber(v) {
    const a = Math.abs(v);
    if (a >= 1000) return v.toFixed(0);
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  function drawChart(canvas, frames, spec) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, canvas.clientWidth), h = Math.max(40, canvas.clientHeight);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const pts = [];
    frames.forEach((f, i) => {
      const v = spec.get(f);
      if (typeof v === "number" && isFinite(v)) pts.push({ i, v, ok: f.verdict === "accepted" });
    });
    canvas.dataset.count = String(pts.length);
    if (pts.length === 0) {
      ctx.fillStyle = "#7d8794";
      ctx.font = "11px system-ui, sans-serif";
      ctx.fillText("no data yet", 8, h / 2);
      return;
    }
    let lo = Infinity, hi = -Infinity;
    for (const p of pts) { lo = Math.min(lo, p.v); hi = Math.max(hi, p.v); }
    if (hi - lo < 1e-9) { const pad = Math.abs(hi) * 0.05 || 1; lo -= pad; hi += pad; }
    const padL = 34, padR = 6, padT = 6, padB = 6;
    const n = frames.length;
    const x = (i) => padL + (n <= 1 ? (w - padL - padR) / 2 : (i / (n - 1)) * (w - padL - padR));
    const y = (v) => padT + (1 - (v - lo) / (hi - lo)) * (h - padT - padB);
    ctx.strokeStyle = "#222c38";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(padL, padT); ctx.lineTo(padL, h - padB); ctx.lineTo(w - padR, h - padB);
    ctx.stroke();
    ctx.fillStyle = "#7d8794";
    ctx.font = "10px system-ui, sans-serif";
    ctx.textBaseline = "top"; ctx.fillText(niceNumber(hi), 2, padT);
    ctx.textBaseline = "bottom"; ctx.fillText(niceNumber(lo), 2, h - padB);
    // Line through accepted points, then markers on top.
    ctx.strokeStyle = spec.color + "66";
    ctx.beginPath();
    let started = false;
    for (const p of pts) {
      if (!p.ok) continue;
      if (started) ctx.lineTo(x(p.i), y(p.v)); else { ctx.moveTo(x(p.i), y(p.v)); started = true; }
    }
    ctx.stroke();
    const r = pts.length > 200 ? 2 : 3;
    for (const p of pts) {
      ctx.beginPath();
      ctx.arc(x(p.i), y(p.v), r, 0, Math.PI * 2);
      if (p.ok) { ctx.fillStyle = spec.color; ctx.fill(); }
      else { ctx.strokeStyle = "#e0605e"; ctx.lineWidth = 1.5; ctx.stroke(); ctx.lineWidth = 1; }
    }
  }

  // ---------------------------------------------------------------- image, zoom and pan

  const view = { scale: 1, tx: 0, ty: 0, fitted: false, nw: 0, nh: 0 };
  let shownUrl = null;    // object URL on screen
  let loadingUrl = null;  // object URL being decoded (replaced if a newer preview arrives)

  function showPreview(id, version, blob, refit) {
    const url = URL.createObjectURL(blob);
    const img = el.img;
    if (loadingUrl) URL.revokeObjectURL(loadingUrl);
    loadingUrl = url;
    img.onload = () => {
      if (loadingUrl !== url) return;
      loadingUrl = null;
      if (shownUrl) URL.revokeObjectURL(shownUrl);
      shownUrl = url;
      const resized = img.naturalWidth !== view.nw || img.naturalHeight !== view.nh;
      view.nw = img.naturalWidth; view.nh = img.naturalHeight;
      if (refit || resized || !view.fitted) fit();
      img.classList.add("loaded");
      el.noImage.hidden = true;
      img.dataset.version = String(version);
      img.dataset.stack = id;
    };
    img.src = url;
  }

  function applyView() {
    el.img.style.transform = `translate(${view.tx}px, ${view.ty}px) scale(${view.scale})`;
  }

  function fit() {
    const vw = el.viewport.clientWidth, vh = el.viewport.clientHeight;
    if (!view.nw || !view.nh || !vw || !vh) return;
    view.scale = Math.min(vw / view.nw, vh / view.nh);
    view.tx = (vw - view.nw * view.scale) / 2;
    view.ty = (vh - view.nh * view.scale) / 2;
    view.fitted = true;
    applyView();
  }

  function zoomAt(px, py, factor) {
    const vw = el.viewport.clientWidth, vh = el.viewport.clientHeight;
    const minScale = Math.min(vw / (view.nw || 1), vh / (view.nh || 1)) * 0.5;
    const next = Math.min(Math.max(view.scale * factor, minScale), 32);
    const f = next / view.scale;
    view.tx = px - (px - view.tx) * f;
    view.ty = py - (py - view.ty) * f;
    view.scale = next;
    applyView();
  }

  function localPoint(ev) {
    const r = el.viewport.getBoundingClientRect();
    return { x: ev.clientX - r.left, y: ev.clientY - r.top };
  }

  const pointers = new Map();
  let pinch = null;
  let lastTap = 0;

  el.viewport.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const p = localPoint(ev);
    zoomAt(p.x, p.y, Math.exp(-ev.deltaY * (ev.deltaMode === 1 ? 0.05 : 0.0015)));
  }, { passive: false });

  el.viewport.addEventListener("pointerdown", (ev) => {
    el.viewport.setPointerCapture(ev.pointerId);
    pointers.set(ev.pointerId, localPoint(ev));
    el.viewport.classList.add("dragging");
    if (pointers.size === 2) {
      const [a, b] = Array.from(pointers.values());
      pinch = { dist: Math.hypot(a.x - b.x, a.y - b.y) || 1, mid: { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 } };
    }
  });

  el.viewport.addEventListener("pointermove", (ev) => {
    const prev = pointers.get(ev.pointerId);
    if (!prev) return;
    const p = localPoint(ev);
    pointers.set(ev.pointerId, p);
    if (pointers.size === 1) {
      view.tx += p.x - prev.x;
      view.ty += p.y - prev.y;
      applyView();
    } else if (pointers.size === 2 && pinch) {
      const [a, b] = Array.from(pointers.values());
      const dist = Math.hypot(a.x - b.x, a.y - b.y) || 1;
      const mid = { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
      view.tx += mid.x - pinch.mid.x;
      view.ty += mid.y - pinch.mid.y;
      zoomAt(mid.x, mid.y, dist / pinch.dist);
      pinch = { dist, mid };
    }
  });

  function endPointer(ev) {
    pointers.delete(ev.pointerId);
    if (pointers.size < 2) pinch = null;
    if (pointers.size === 0) el.viewport.classList.remove("dragging");
  }
  el.viewport.addEventListener("pointerup", (ev) => {
    endPointer(ev);
    if (ev.pointerType === "touch") {  // double tap to fit
      const now = performance.now();
      if (now - lastTap < 300) fit();
      lastTap = now;
    }
  });
  el.viewport.addEventListener("pointercancel", endPointer);
  el.viewport.addEventListener("dblclick", fit);
  window.addEventListener("resize", () => { fit(); renderFramesDeferred(); });

  // ---------------------------------------------------------------- outreach mode

  function setOutreach(on, fromGesture) {
    document.body.classList.toggle("outreach", on);
    const url = new URL(location.href);
    if (on) url.searchParams.set("mode", "outreach"); else url.searchParams.delete("mode");
    history.replaceState(null, "", url);
    if (on && fromGesture && document.documentElement.requestFullscreen && !document.fullscreenElement) {
      document.documentElement.requestFullscreen().catch(() => { /* not allowed: stay windowed */ });
    }
    if (!on && document.fullscreenElement && document.exitFullscreen) {
      document.exitFullscreen().catch(() => {});
    }
    requestAnimationFrame(fit);
  }
  $("btn-outreach").addEventListener("click", () => setOutreach(true, true));
  $("btn-exit-outreach").addEventListener("click", () => setOutreach(false, true));
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && document.body.classList.contains("outreach")) setOutreach(false, true);
  });
  document.addEventListener("fullscreenchange", () => requestAnimationFrame(fit));

  // ---------------------------------------------------------------- operator panel

  $("btn-operator").addEventListener("click", (ev) => {
    const open = el.opPanel.hidden;
    el.opPanel.hidden = !open;
    ev.currentTarget.setAttribute("aria-expanded", String(open));
  });
  el.opToken.value = sessionStorage.getItem("livestack.token") || "";
  el.opToken.addEventListener("input", () => sessionStorage.setItem("livestack.token", el.opToken.value));

  function showResult(ok, text) {
    el.opResult.dataset.ok = String(ok);
    el.opResult.textContent = text;
  }

  for (const button of document.querySelectorAll("button[data-command]")) {
    button.addEventListener("click", () => {
      const name = button.dataset.command;
      const args = {};
      if (state.current) args.stack_id = state.current;
      if (name === "exclude_frame" || name === "set_reference") {
        const file = el.opFile.value.trim();
        if (!file) { showResult(false, "Choose a frame file first (click a rejected frame)."); return; }
        args.file = file;
      }
      if (name === "reset" && !window.confirm("Reset the current stack? Its frames are dropped.")) return;
      if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
        showResult(false, "Not connected to the server.");
        return;
      }
      const id = ++state.commandId;
      state.pending.set(id, button);
      button.disabled = true;
      showResult("", `${name}…`);
      state.ws.send(JSON.stringify({ v: 1, type: "command", id, name, args, token: el.opToken.value }));
    });
  }

  function onCommandResult(msg) {
    const button = state.pending.get(msg.id);
    state.pending.delete(msg.id);
    if (button) button.disabled = false;
    const name = button ? button.dataset.command : "command";
    if (msg.ok) showResult(true, `${name}: done`);
    else showResult(false, `Refused: ${msg.error || "unknown error"}`);
  }

  // ---------------------------------------------------------------- alerts

  function showAlert(data) {
    const div = document.createElement("div");
    div.className = "alert";
    div.dataset.level = data.level || "warning";
    div.textContent = (data.stack_id ? data.stack_id + ": " : "") + (data.message || data.code || "alert");
    el.alerts.prepend(div);
    while (el.alerts.children.length > MAX_ALERTS) el.alerts.lastChild.remove();
  }

  // ---------------------------------------------------------------- WebSocket

  function setStatus(s, text) {
    el.status.dataset.state = s;
    el.status.textContent = text;
  }

  function onText(text) {
    let msg;
    try { msg = JSON.parse(text); } catch (err) { return; }
    if (!msg || msg.v !== 1) return;
    const data = msg.data || {};
    switch (msg.type) {
      case "hello":
        state.retryMs = 500;
        // Preview versions restart at 1 when the daemon restarts: forget the old run's.
        if (data.run_id !== state.runId) {
          state.previews.clear();
          state.runId = data.run_id;
        }
        for (const s of data.stacks || []) upsertStack(s);
        renderPicker();
        chooseDefaultStack();
        if (state.current) loadFrames(state.current);
        renderSummary();
        break;
      case "frame":
        addFrame(data);
        break;
      case "stack": {
        const isNew = !state.stacks.has(data.stack_id);
        upsertStack(data);
        renderPicker();
        if (isNew && !state.pinned) selectStack(data.stack_id, false);
        else if (!state.current || !state.stacks.has(state.current)) chooseDefaultStack();
        if (data.stack_id === state.current) renderSummary();
        document.dispatchEvent(new CustomEvent("livestack:stack", { detail: data }));  // solve.js
        break;
      }
      case "alert":
        showAlert(data);
        break;
      case "gap":  // we were too slow and lost events: refetch the current stack
        if (state.current) loadFrames(state.current);
        break;
      case "command_result":
        onCommandResult(msg);
        break;
      default:
        break;
    }
  }

  function onBinary(buf) {
    if (buf.byteLength < 4) return;
    const len = new DataView(buf).getUint32(0, false);
    if (4 + len > buf.byteLength) return;
    let header;
    try { header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, len))); } catch (err) { return; }
    const blob = new Blob([new Uint8Array(buf, 4 + len)], { type: header.mime || "image/jpeg" });
    const have = state.previews.get(header.stack_id);
    if (have && have.version >= header.version) return;
    state.previews.set(header.stack_id, { version: header.version, blob });
    if (!state.current) selectStack(header.stack_id, false);
    if (header.stack_id === state.current) showPreview(header.stack_id, header.version, blob, false);
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    setStatus("connecting", "connecting…");
    const ws = new WebSocket(`${scheme}//${location.host}/ws`);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    ws.onopen = () => setStatus("open", "live");
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") onText(ev.data); else onBinary(ev.data);
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      for (const button of state.pending.values()) button.disabled = false;
      state.pending.clear();
      const wait = state.retryMs * (0.75 + Math.random() * 0.5);  // jitter: phones reconnect apart
      state.retryMs = Math.min(state.retryMs * 2, 30000);
      setStatus("closed", `reconnecting in ${Math.ceil(wait / 1000)}s` + (ev.reason ? ` (${ev.reason})` : ""));
      setTimeout(connect, wait);
    };
  }

  el.picker.addEventListener("change", () => selectStack(el.picker.value, true));
  if (params.get("mode") === "outreach") setOutreach(true, false);
  renderSummary();
  renderFrames();
  connect();
})();
