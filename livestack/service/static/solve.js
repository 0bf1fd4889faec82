// livestack viewer: where the stack points (plate-solve status, field, RA/Dec under the cursor).
// Reads each stack summary's "solve" object ({state, message, wcs, shape, field}) from the
// "livestack:stack" events app.js forwards and from GET /api/stacks; evaluates the TAN-SIP
// WCS itself (no library, nothing from the internet).
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const solves = new Map();  // stack_id -> solve object
  const info = $("solve-info");
  const cursor = $("cursor-radec");
  const img = $("preview");
  if (!info || !cursor || !img) return;

  function sip(cards, name, u, v) {
    let sum = 0;
    const order = Number(cards[name + "_ORDER"] || 0);
    for (let p = 0; p <= order; p++) {
      for (let q = 0; q <= order - p; q++) {
        const c = cards[name + "_" + p + "_" + q];
        if (c) sum += c * Math.pow(u, p) * Math.pow(v, q);
      }
    }
    return sum;
  }

  // 0-based pixel (x, y) -> [ra, dec] in degrees (gnomonic projection, SIP distortion).
  function pixelToWorld(cards, x, y) {
    const d2r = Math.PI / 180;
    const u = x + 1 - cards.CRPIX1, v = y + 1 - cards.CRPIX2;
    const uu = u + sip(cards, "A", u, v), vv = v + sip(cards, "B", u, v);
    const xi = (cards.CD1_1 * uu + cards.CD1_2 * vv) * d2r;
    const eta = (cards.CD2_1 * uu + cards.CD2_2 * vv) * d2r;
    const ra0 = cards.CRVAL1 * d2r, dec0 = cards.CRVAL2 * d2r;
    const den = Math.cos(dec0) - eta * Math.sin(dec0);
    const ra = ra0 + Math.atan2(xi, den);
    const dec = Math.atan2(eta * Math.cos(dec0) + Math.sin(dec0), Math.hypot(xi, den));
    return [((ra / d2r) % 360 + 360) % 360, dec / d2r];
  }

  // Sexagesimal text, rounded once (to 0.1 s of RA, 1" of Dec) so that 59.96 s carries.
  function sexa(value, hours) {
    const sign = value < 0 ? "-" : (hours ? "" : "+");
    const steps = hours ? 36000 : 3600;  // per hour (tenths of a second) / per degree (arcsec)
    let n = Math.round(Math.abs(hours ? value / 15 : value) * steps);
    if (hours) n %= 24 * steps;
    const a = Math.floor(n / steps); n -= a * steps;
    const b = Math.floor(n / (steps / 60)); n -= b * (steps / 60);
    const pad = (v, w) => String(v).padStart(w, "0");
    return hours ? `${pad(a, 2)}h${pad(b, 2)}m${(n / 10).toFixed(1).padStart(4, "0")}s`
                 : `${sign}${pad(a, 2)}°${pad(b, 2)}′${pad(n, 2)}″`;
  }

  function current() { return solves.get(img.dataset.stack || ""); }

  function render() {
    const s = current();
    if (!s) { info.hidden = true; return; }
    info.hidden = false;
    info.dataset.state = s.state;
    if (s.state === "solved" && s.field) {
      const f = s.field;
      info.textContent = `${sexa(f.ra_deg, true)} ${sexa(f.dec_deg, false)} · ` +
        `${f.width_deg.toFixed(2)}°×${f.height_deg.toFixed(2)}° · ${f.scale_arcsec.toFixed(2)}″/px · ` +
        `PA ${f.pa_deg.toFixed(1)}°${f.flipped ? " (mirrored)" : ""} · solved in ${s.elapsed_s} s`;
    } else if (s.state === "solving" || s.state === "waiting") {
      info.textContent = s.state === "solving" ? "plate solving…" : "not solved yet";
    } else {
      info.textContent = `not solved: ${s.message || s.reason || s.state}`;
    }
    info.title = s.message || "";
  }

  function take(summary) {
    if (summary && summary.stack_id) {
      if (summary.solve) solves.set(summary.stack_id, summary.solve);
      else solves.delete(summary.stack_id);
    }
  }

  document.addEventListener("livestack:stack", (ev) => { take(ev.detail); render(); });
  new MutationObserver(render).observe(img, { attributes: true, attributeFilter: ["data-stack"] });
  fetch("/api/stacks", { cache: "no-store" }).then((r) => r.ok ? r.json() : null).then((body) => {
    if (body && Array.isArray(body.stacks)) body.stacks.forEach((s) => take(s));
    render();
  }).catch(() => {});

  img.addEventListener("pointermove", (ev) => {
    const s = current();
    if (!s || s.state !== "solved" || !s.wcs || !s.shape || !img.naturalWidth) {
      cursor.hidden = true; return;
    }
    const rect = img.getBoundingClientRect();
    const x = (ev.clientX - rect.left) / rect.width * s.shape[1] - 0.5;
    const y = (ev.clientY - rect.top) / rect.height * s.shape[0] - 0.5;
    const [ra, dec] = pixelToWorld(s.wcs, x, y);
    cursor.hidden = false;
    cursor.textContent = `RA ${sexa(ra, true)}  Dec ${sexa(dec, false)}`;
    cursor.dataset.ra = ra.toFixed(6); cursor.dataset.dec = dec.toFixed(6);
  });
  img.addEventListener("pointerleave", () => { cursor.hidden = true; });

  window.livestackSolve = { pixelToWorld };  // for the browser test
})();
