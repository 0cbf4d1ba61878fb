// freqtag serve's page: files in, predict's record out, drawn here (no library, nothing from elsewhere).
"use strict";

const PARALLEL = 2;          // uploads in flight at once; the server's --jobs bounds tagging itself
const LABEL_W = 150;         // taggram: tag names on the left, in CSS pixels
const ROW_H = 10;            // taggram: one row per tag
const AXIS_H = 22;           // taggram: the time axis below
const MAGMA = [[0, 0, 0, 4], [0.25, 81, 18, 124], [0.5, 183, 55, 121], [0.75, 252, 137, 97], [1, 252, 253, 191]];

let model = null;            // GET /api/model
const queue = [];
let running = 0;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(p) { return p.toFixed(3); }

function mib(bytes) { return String(Math.round(bytes / 104857.6) / 10); }  // as the server says it (%g)

// ------------------------------------------------------------------ the model

async function loadModel() {
  const facts = document.getElementById("model-facts");
  try {
    const r = await fetch("/api/model");
    model = await r.json();
  } catch (e) {
    facts.replaceChildren(el("dt", "", "model"), el("dd", "", "cannot reach the freqtag server: is it still running?"));
    return;
  }
  const rows = [
    ["features", model.features + (model.ensemble ? ` (ensemble of ${model.models.length})` : "")],
    ["task", model.task],
    ["tags", String(model.n_tags)],
    ["trained on", [...new Set(model.models.map(m => m.trained_on))].join("; ")],
    ["decisions", model.threshold_source],
    ["checkpoint", model.models.map(m => `${m.checkpoint} (${m.features}, ${m.window_s.toFixed(2)} s windows)`).join("; ")],
  ];
  facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
  const warning = document.getElementById("model-warning");
  warning.hidden = !model.warning;
  warning.textContent = model.warning ? `Demo model. ${model.warning}.` : "";
  document.getElementById("limit").textContent =
    `MP3, Ogg, Opus, FLAC, WAV, AIFF, up to ${mib(model.max_upload_bytes)} MiB each. ` +
    "Each file is sent to this server, tagged, and deleted.";
}

// ------------------------------------------------------------------ uploads

function addFiles(files) {
  const batch = document.createDocumentFragment();  // the newest files on top, in the order given
  for (const file of files) {
    const card = document.getElementById("card-template").content.firstElementChild.cloneNode(true);
    card.querySelector(".name").textContent = file.name;
    batch.append(card);
    queue.push({file, card});
  }
  document.getElementById("results").prepend(batch);
  pump();
}

function pump() {
  while (running < PARALLEL && queue.length) {
    const job = queue.shift();
    running += 1;
    tag(job.file, job.card).finally(() => { running -= 1; pump(); });
  }
}

function setState(card, state, text) {
  card.dataset.state = state;
  card.querySelector(".status").textContent = text;
}

function fail(card, message) {
  setState(card, "failed", "failed");
  const e = card.querySelector(".error");
  e.textContent = message;
  e.hidden = false;
}

async function tag(file, card) {
  if (model && file.size > model.max_upload_bytes) {
    const limit = mib(model.max_upload_bytes);
    fail(card, `${file.name} is ${mib(file.size)} MiB: larger than this server's limit of ${limit} MiB ` +
      `(--max-upload-mb ${limit}); send a smaller file, or restart freqtag serve with a higher --max-upload-mb`);
    return;
  }
  setState(card, "tagging", "tagging\u2026");
  const form = new FormData();
  form.append("file", file, file.name);
  let response, text, body = null;
  try {
    response = await fetch("/api/tag?taggram=1", {method: "POST", body: form});
    text = await response.text();
  } catch (e) {
    fail(card, `${file.name}: no answer from the server (${e.message}); is freqtag serve still running?`);
    return;
  }
  try { body = JSON.parse(text); } catch (e) { /* not JSON: shown as text below */ }
  if (!response.ok || body === null) {
    fail(card, `${file.name}: ${(body && body.error) || `HTTP ${response.status}: ${text.slice(0, 200)}`}`);
    return;
  }
  show(card, file, body);
  setState(card, "done", `${body.duration_s.toFixed(1)} s of audio`);
}

// ------------------------------------------------------------------ results

function show(card, file, rec) {
  const tags = Object.keys(rec.tags);
  const probs = tags.map(t => rec.tags[t]);
  const order = tags.map((_, i) => i).sort((a, b) => probs[b] - probs[a] || a - b);
  const thresholds = model ? model.thresholds : tags.map(() => 0.5);

  const top = card.querySelector(".top-list");
  for (const t of rec.top) {
    const li = el("li", "top-tag");
    li.append(el("span", "tag", t.tag), el("span", "prob", fmt(t.probability)));
    top.append(li);
  }
  const decisions = card.querySelector(".decisions");
  if (rec.decisions.length === 0) decisions.append(el("li", "none", "none"));
  for (const t of rec.decisions) decisions.append(el("li", "chip", t));
  card.querySelector(".facts").textContent =
    `${rec.duration_s.toFixed(1)} s of audio; ${model && model.ensemble ? "mean of the models' " : ""}` +
    "probabilities averaged over the track's windows.";

  drawBars(card.querySelector(".bars"), tags, probs, thresholds, order, new Set(rec.decisions));
  const audio = card.querySelector(".player");
  audio.src = URL.createObjectURL(file);
  card.querySelector(".body").hidden = false;
  setupTaggram(card, rec, tags, order, audio);
}

function drawBars(box, tags, probs, thresholds, order, decided) {
  for (const i of order) {
    const row = el("div", decided.has(tags[i]) ? "bar-row on" : "bar-row");
    const track = el("div", "bar-track");
    const bar = el("div", "bar");
    bar.style.width = `${(probs[i] * 100).toFixed(2)}%`;
    const tick = el("div", "tick");
    tick.style.left = `${(thresholds[i] * 100).toFixed(2)}%`;
    tick.title = `threshold ${fmt(thresholds[i])}`;
    track.append(bar, tick);
    row.append(el("span", "bar-tag", tags[i]), track, el("span", "bar-prob", fmt(probs[i])));
    box.append(row);
  }
}

// ------------------------------------------------------------------ taggram

function magma(v) {
  for (let k = 1; k < MAGMA.length; k++) {
    if (v <= MAGMA[k][0] || k === MAGMA.length - 1) {
      const [a, b] = [MAGMA[k - 1], MAGMA[k]];
      const f = Math.min(1, Math.max(0, (v - a[0]) / (b[0] - a[0])));
      return [1, 2, 3].map(j => Math.round(a[j] + f * (b[j] - a[j])));
    }
  }
  return [0, 0, 0];
}

// The cells as an image (one pixel per window and tag, rows in `order`), scaled up when drawn.
// Colours span the file's own range of probabilities, [lo, hi], so that changes over time show.
function cellImage(acts, order, lo, hi) {
  const cols = acts.length, rows = order.length;
  const img = document.createElement("canvas");
  img.width = Math.max(1, cols);
  img.height = rows;
  const ctx = img.getContext("2d");
  const data = ctx.createImageData(img.width, rows);
  const range = Math.max(1e-6, hi - lo);
  for (let c = 0; c < cols; c++) {
    for (let r = 0; r < rows; r++) {
      const [R, G, B] = magma((acts[c][order[r]] - lo) / range);
      const o = 4 * (r * img.width + c);
      data.data.set([R, G, B, 255], o);
    }
  }
  ctx.putImageData(data, 0, 0);
  return img;
}

function setupTaggram(card, rec, tags, order, audio) {
  const canvas = card.querySelector(".taggram-canvas");
  const acts = rec.taggram.activations, step = rec.taggram.step_s;
  const span = Math.max(rec.duration_s, acts.length * step);
  const lo = Math.min(...acts.map(c => Math.min(...c))), hi = Math.max(...acts.map(c => Math.max(...c)));
  const image = cellImage(acts, order, lo, hi);
  const now = card.querySelector(".now");
  card.querySelector(".scale").textContent =
    `${acts.length} windows of ${step.toFixed(2)} s; colour from ${fmt(lo)} (dark) to ${fmt(hi)} (light), ` +
    "this file's lowest and highest window probability. Click the taggram to move the player there.";
  canvas.dataset.columns = String(acts.length);
  canvas.setAttribute("aria-label", `taggram of ${rec.path}: ${tags.length} tags over ${acts.length} windows`);
  const layout = () => {
    const w = canvas.parentElement.clientWidth;
    const plotW = Math.max(50, w - LABEL_W - 8);
    card.querySelector(".player-row").style.paddingLeft = `${LABEL_W}px`;
    audio.style.width = `${plotW}px`;
    return {w, plotW, h: tags.length * ROW_H + AXIS_H};
  };
  const draw = () => {
    const {w, plotW, h} = layout();
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    canvas.style.width = `${w}px`;
    canvas.style.height = `${h}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(image, LABEL_W, 0, plotW * (acts.length * step) / span, tags.length * ROW_H);
    drawLabels(ctx, tags, order, rec.top.length);
    drawAxis(ctx, plotW, tags.length * ROW_H, span);
    const t = audio.currentTime || 0;
    const x = LABEL_W + plotW * Math.min(t, span) / span;
    ctx.fillStyle = "#fff";
    ctx.fillRect(x - 2, 0, 4, tags.length * ROW_H);
    ctx.fillStyle = "#0a84ff";
    ctx.fillRect(x - 1, 0, 2, tags.length * ROW_H);
    const col = Math.min(acts.length - 1, Math.floor(t / step));
    const best = order.slice().sort((a, b) => acts[col][b] - acts[col][a]).slice(0, 3);
    now.textContent = `at ${t.toFixed(1)} s: ${best.map(i => tags[i]).join(", ")}`;
  };
  const seek = (ev) => {
    const {plotW} = layout();
    const x = ev.offsetX - LABEL_W;
    if (x >= 0 && x <= plotW && Number.isFinite(audio.duration)) audio.currentTime = Math.min(audio.duration, span * x / plotW);
  };
  let playing = false;
  const frame = () => { draw(); if (playing) requestAnimationFrame(frame); };
  audio.addEventListener("play", () => { playing = true; requestAnimationFrame(frame); });
  audio.addEventListener("pause", () => { playing = false; draw(); });
  audio.addEventListener("seeked", draw);
  audio.addEventListener("timeupdate", () => { if (!playing) draw(); });
  canvas.addEventListener("click", seek);
  window.addEventListener("resize", draw);
  draw();
}

function drawLabels(ctx, tags, order, nTop) {
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  order.forEach((i, r) => {
    ctx.font = r < nTop ? "bold 10px sans-serif" : "9px sans-serif";
    ctx.fillStyle = r < nTop ? "#111" : "#555";
    ctx.fillText(tags[i], LABEL_W - 6, r * ROW_H + ROW_H / 2);
  });
}

function drawAxis(ctx, plotW, y, span) {
  const nice = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600];
  const every = nice.find(s => plotW * s / span >= 60) || 3600;
  ctx.fillStyle = "#333";
  ctx.font = "10px sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let s = 0; s <= span + 1e-9; s += every) {
    const x = LABEL_W + plotW * s / span;
    ctx.fillRect(x, y, 1, 4);
    const label = s >= 60 ? `${Math.floor(s / 60)}:${String(Math.round(s % 60)).padStart(2, "0")}` : `${s} s`;
    ctx.fillText(label, x, y + 6);
  }
}

// ------------------------------------------------------------------ wiring

function wire() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => { addFiles([...input.files]); input.value = ""; });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => addFiles([...e.dataTransfer.files]));
  // a file dropped beside the zone must not replace the page with the file
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

wire();
loadModel();
