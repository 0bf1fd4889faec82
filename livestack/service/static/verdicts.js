/* livestack viewer: every frame's verdict, newest first (accepted and rejected).
 *
 * app.js dispatches "livestack:frames" with the current stack's frames (oldest first)
 * whenever it redraws them; this block only renders that list. Accepted frames show
 * their stars, FWHM, weight and the pixels the stack clipped as outliers; a frame whose
 * clipped count jumps far above the others' (a satellite or aircraft trail removed from
 * the stack) is marked. Rejected frames show the gate's reason and message.
 */
"use strict";

(() => {
  const MAX_SHOWN = 60;
  const TRAIL_FACTOR = 3;   // clipped pixels above 3x the median: a trail was removed
  const TRAIL_MIN_PX = 500; // ... and at least this many (noise clipping stays quiet)

  const list = document.getElementById("verdict-list");
  const count = document.getElementById("verdicts-count");
  if (!list || !count) return;

  const baseName = (path) => String(path || "").split(/[\\/]/).pop();

  function median(values) {
    if (!values.length) return 0;
    const s = values.slice().sort((a, b) => a - b);
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
  }

  function describe(f, typicalClipped) {
    if (f.verdict !== "accepted") {
      return (f.reason || f.verdict) + (f.message ? " — " + f.message : "");
    }
    const m = f.metrics || {};
    const parts = [];
    if (typeof m.star_count === "number") parts.push(`${m.star_count} stars`);
    if (typeof m.fwhm_px === "number") parts.push(`FWHM ${m.fwhm_px.toFixed(2)} px`);
    if (typeof f.weight === "number") parts.push(`weight ${f.weight.toFixed(2)}`);
    if (typeof f.rejected_high === "number") parts.push(`${f.rejected_high} px clipped`);
    return parts.join(" · ");
  }

  function render(frames) {
    const clipped = frames
      .filter((f) => f.verdict === "accepted" && typeof f.rejected_high === "number")
      .map((f) => f.rejected_high);
    const typical = median(clipped);
    list.textContent = "";
    let accepted = 0;
    for (const f of frames) if (f.verdict === "accepted") accepted += 1;
    for (const f of frames.slice(-MAX_SHOWN).reverse()) {
      const li = document.createElement("li");
      li.dataset.verdict = f.verdict || "";
      li.dataset.file = f.file || "";
      const file = document.createElement("span");
      file.className = "file";
      file.textContent = baseName(f.file);
      const verdict = document.createElement("span");
      verdict.className = "verdict";
      verdict.textContent = f.verdict || "?";
      const text = document.createElement("span");
      text.className = "detail";
      text.textContent = describe(f, typical);
      li.append(file, verdict, text);
      if (f.verdict === "accepted" && typeof f.rejected_high === "number" &&
          f.rejected_high >= TRAIL_MIN_PX && f.rejected_high > TRAIL_FACTOR * typical) {
        const trail = document.createElement("span");
        trail.className = "trail";
        trail.textContent = " — trail removed from the stack";
        li.dataset.trail = "1";
        li.append(trail);
      }
      list.appendChild(li);
    }
    list.dataset.count = String(frames.length);
    list.dataset.accepted = String(accepted);
    list.dataset.rejected = String(frames.length - accepted);
    count.textContent = String(frames.length);
  }

  document.addEventListener("livestack:frames", (ev) => render(ev.detail || []));
})();
