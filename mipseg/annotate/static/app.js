// mipseg_annotate page: plain JavaScript, no build step, no external files.
// The server sends raw intensities and class maps as bytes (shape in the X-Mipseg-Meta header);
// everything on screen is drawn here on canvases.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const COLOURS = [
  [0, 0, 0], [255, 70, 70], [70, 220, 90], [80, 140, 255], [255, 215, 0],
  [255, 80, 255], [0, 225, 225], [255, 150, 40], [170, 110, 255], [160, 255, 160],
];
const MAX_UNDO = 100;

const $ = (id) => document.getElementById(id);
const el = {};
for (const id of [
  "dataset-name", "model-status", "case-list", "target-name", "axis-group", "axis", "slice-group",
  "slice", "slice-marks", "slice-label", "goto-suggested", "tool-brush", "tool-eraser", "size",
  "size-label", "class", "undo", "redo", "save", "delete", "win-low", "win-high", "win-reset",
  "opacity", "depth-group", "depth-overlay", "show-labels", "prefill-source", "threshold-group",
  "threshold", "threshold-label", "apply-prefill", "stage", "canvas", "status", "cursor",
]) el[id] = $(id);

const S = {
  dataset: null, cases: [], model: null,
  target: null,            // {case, kind, index}
  rows: 0, cols: 0, spacing: [1, 1], image: null, low: 0, high: 1, defaultWindow: [0, 1],
  minimum: 0, maximum: 1, suggested: false,
  depth: null, depthExtent: 1,
  labels: null, baseline: null, version: "", fileProblem: null, dirty: false, previewing: false,
  undo: [], redo: [],
  tool: "brush", size: 1, cls: 1, opacity: 0.6, showDepth: false, showLabels: true,
  zoom: 1, panX: 0, panY: 0, aspect: [1, 1],
  stroke: null, pan: null, spaceDown: false, request: 0, thresholdLevel: null, chain: [],
};

// ---------------------------------------------------------------- server -------------------------

async function api(path, options = {}) {
  options.headers = Object.assign({ "X-Mipseg-Token": TOKEN }, options.headers || {});
  const response = await fetch(path, options);
  if (response.status === 403) throw new Error(await response.text());
  return response;
}

async function apiJSON(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw Object.assign(new Error(body.error || response.statusText), { status: response.status, body });
  return body;
}

async function apiBinary(path) {
  const response = await api(path);
  if (!response.ok) {
    let body = {};
    try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
    throw Object.assign(new Error(body.error || response.statusText), { status: response.status, body });
  }
  const meta = JSON.parse(response.headers.get("X-Mipseg-Meta") || "{}");
  return { meta, buffer: await response.arrayBuffer() };
}

function targetPath(t, what) {
  return `/api/cases/${encodeURIComponent(t.case)}/${t.kind}/${t.index}/${what}`;
}

// ---------------------------------------------------------------- status line --------------------

function say(text, kind = "") {
  el.status.textContent = text;
  el.status.className = kind;
}

// ---------------------------------------------------------------- canvases -----------------------

const base = document.createElement("canvas");     // window-levelled image, 1 canvas pixel = 1 image pixel
const depthLayer = document.createElement("canvas");
const labelLayer = document.createElement("canvas");
const ctx = el.canvas.getContext("2d");

function renderBase() {
  const { rows, cols, image, low, high } = S;
  base.width = cols; base.height = rows;
  const g = base.getContext("2d");
  const data = g.createImageData(cols, rows);
  const scale = 255 / Math.max(high - low, 1e-12);
  for (let i = 0; i < rows * cols; i++) {
    const v = Math.max(0, Math.min(255, (image[i] - low) * scale));
    data.data[4 * i] = data.data[4 * i + 1] = data.data[4 * i + 2] = v;
    data.data[4 * i + 3] = 255;
  }
  g.putImageData(data, 0, 0);
}

function renderDepth() {
  if (!S.depth) return;
  depthLayer.width = S.cols; depthLayer.height = S.rows;
  const g = depthLayer.getContext("2d");
  const data = g.createImageData(S.cols, S.rows);
  for (let i = 0; i < S.rows * S.cols; i++) {
    const [r, gg, b] = hue(S.depth[i] / Math.max(S.depthExtent - 1, 1));
    data.data[4 * i] = r; data.data[4 * i + 1] = gg; data.data[4 * i + 2] = b; data.data[4 * i + 3] = 255;
  }
  g.putImageData(data, 0, 0);
}

function hue(t) {  // blue (near) -> green -> red (far)
  const h = (1 - t) * 240 / 60, x = 1 - Math.abs((h % 2) - 1);
  const [r, g, b] = h < 1 ? [1, x, 0] : h < 2 ? [x, 1, 0] : h < 3 ? [0, 1, x] : [0, x, 1];
  return [r * 255, g * 255, b * 255];
}

function renderLabels(r0 = 0, c0 = 0, r1 = S.rows - 1, c1 = S.cols - 1) {
  if (labelLayer.width !== S.cols || labelLayer.height !== S.rows) {
    labelLayer.width = S.cols; labelLayer.height = S.rows;
    r0 = 0; c0 = 0; r1 = S.rows - 1; c1 = S.cols - 1;
  }
  r0 = Math.max(0, r0); c0 = Math.max(0, c0); r1 = Math.min(S.rows - 1, r1); c1 = Math.min(S.cols - 1, c1);
  if (r1 < r0 || c1 < c0) return;
  const w = c1 - c0 + 1, h = r1 - r0 + 1;
  const g = labelLayer.getContext("2d");
  const data = g.createImageData(w, h);
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      const v = S.labels[(r + r0) * S.cols + c + c0], o = 4 * (r * w + c);
      if (v) {
        const colour = COLOURS[v % COLOURS.length];
        data.data[o] = colour[0]; data.data[o + 1] = colour[1]; data.data[o + 2] = colour[2]; data.data[o + 3] = 255;
      }
    }
  }
  g.putImageData(data, c0, r0);
}

function resizeCanvas() {
  const box = el.stage.getBoundingClientRect();
  el.canvas.width = Math.max(1, Math.round(box.width));
  el.canvas.height = Math.max(1, Math.round(box.height));
}

function draw() {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, el.canvas.width, el.canvas.height);
  if (!S.image) return;
  ctx.imageSmoothingEnabled = false;
  ctx.setTransform(S.zoom * S.aspect[1], 0, 0, S.zoom * S.aspect[0], S.panX, S.panY);
  ctx.globalAlpha = 1;
  ctx.drawImage(base, 0, 0);
  if (S.showDepth && S.depth) {
    ctx.globalAlpha = 0.45;
    ctx.drawImage(depthLayer, 0, 0);
  }
  if (S.showLabels) {
    ctx.globalAlpha = S.opacity;
    ctx.drawImage(labelLayer, 0, 0);
  }
  ctx.globalAlpha = 1;
  if (S.cursorAt) {
    const [r, c] = S.cursorAt, half = S.size / 2;
    ctx.strokeStyle = S.tool === "eraser" ? "#fff" : "rgb(" + COLOURS[S.cls % COLOURS.length].join(",") + ")";
    ctx.lineWidth = 1 / S.zoom;
    if (S.size <= 1) ctx.strokeRect(Math.floor(c), Math.floor(r), 1, 1);
    else {
      ctx.beginPath();
      ctx.ellipse(Math.floor(c) + 0.5, Math.floor(r) + 0.5, half, half, 0, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }
}

function fit() {
  if (!S.rows) return;
  const w = el.canvas.width, h = el.canvas.height;
  const width = S.cols * S.aspect[1], height = S.rows * S.aspect[0];
  S.zoom = Math.min(w / width, h / height) * 0.96;
  S.panX = (w - width * S.zoom) / 2;
  S.panY = (h - height * S.zoom) / 2;
  draw();
}

// image (row, col) <-> canvas pixel; exposed for the browser test
function screenToImage(x, y) {
  return [(y - S.panY) / (S.zoom * S.aspect[0]), (x - S.panX) / (S.zoom * S.aspect[1])];
}
function imageToScreen(row, col) {
  const box = el.canvas.getBoundingClientRect();
  return [box.left + S.panX + (col + 0.5) * S.zoom * S.aspect[1], box.top + S.panY + (row + 0.5) * S.zoom * S.aspect[0]];
}
window.mipseg = { imageToScreen, state: S };

// ---------------------------------------------------------------- drawing ------------------------

function stamp(row, col, value, box) {
  const r = Math.floor(row), c = Math.floor(col);
  if (S.size <= 1) {
    paint(r, c, value, box);
    return;
  }
  const radius = S.size / 2, reach = Math.ceil(radius);
  for (let dr = -reach; dr <= reach; dr++) {
    for (let dc = -reach; dc <= reach; dc++) {
      if (dr * dr + dc * dc <= radius * radius) paint(r + dr, c + dc, value, box);
    }
  }
}

function paint(r, c, value, box) {
  if (r < 0 || c < 0 || r >= S.rows || c >= S.cols) return;
  S.labels[r * S.cols + c] = value;
  box[0] = Math.min(box[0], r); box[1] = Math.min(box[1], c);
  box[2] = Math.max(box[2], r); box[3] = Math.max(box[3], c);
}

function strokeTo(row, col) {
  const value = S.tool === "eraser" ? 0 : S.cls;
  const [r0, c0] = S.stroke.last;
  const steps = Math.max(1, Math.ceil(2 * Math.max(Math.abs(row - r0), Math.abs(col - c0))));
  const box = [Infinity, Infinity, -Infinity, -Infinity];
  for (let i = 1; i <= steps; i++) {
    stamp(r0 + ((row - r0) * i) / steps, c0 + ((col - c0) * i) / steps, value, box);
  }
  S.stroke.last = [row, col];
  if (box[0] !== Infinity) renderLabels(box[0], box[1], box[2], box[3]);
  draw();
}

function remember() {
  S.undo.push(S.labels.slice());
  if (S.undo.length > MAX_UNDO) S.undo.shift();
  S.redo = [];
  updateButtons();
}

function undo() {
  if (!S.undo.length) return;
  S.redo.push(S.labels);
  S.labels = S.undo.pop();
  afterEdit();
}

function redo() {
  if (!S.redo.length) return;
  S.undo.push(S.labels);
  S.labels = S.redo.pop();
  afterEdit();
}

// unsaved = different from what the page opened (the saved file or the automatic pre-fill) or saved
function updateDirty() {
  const a = S.labels, b = S.baseline;
  let same = !!b && a.length === b.length;
  for (let i = 0; same && i < a.length; i++) same = a[i] === b[i];
  S.dirty = !same;
  markUnsaved();
}

function afterEdit() {
  updateDirty();
  S.previewing = false;
  renderLabels();
  draw();
  updateButtons();
  markUnsaved();
}

function setTool(tool) {
  S.tool = tool;
  el["tool-brush"].classList.toggle("active", tool === "brush");
  el["tool-eraser"].classList.toggle("active", tool === "eraser");
  draw();
}

function setSize(size) {
  S.size = Math.max(1, Math.min(40, size));
  el.size.value = S.size;
  el["size-label"].textContent = S.size + " px";
  draw();
}

function setClass(value) {
  const exists = S.dataset.labels.some((l) => l.value === value && value !== 0);
  if (!exists) return;
  S.cls = value;
  el.class.value = String(value);
  draw();
}

function updateButtons() {
  el.undo.disabled = !S.undo.length;
  el.redo.disabled = !S.redo.length;
  el.save.disabled = !S.labels;
  el.delete.disabled = !S.version;
}

// ---------------------------------------------------------------- mouse and keys -----------------

el.canvas.addEventListener("contextmenu", (e) => e.preventDefault());
el.canvas.addEventListener("pointerdown", (e) => {
  if (!S.image) return;
  el.canvas.setPointerCapture(e.pointerId);
  if (e.button === 1 || e.button === 2 || S.spaceDown) {
    S.pan = { x: e.clientX, y: e.clientY, panX: S.panX, panY: S.panY };
    return;
  }
  if (e.button !== 0) return;
  const [row, col] = pointer(e);
  remember();
  S.stroke = { last: [row, col] };
  S.previewing = false;
  strokeTo(row, col);
});
el.canvas.addEventListener("pointermove", (e) => {
  if (!S.image) return;
  if (S.pan) {
    S.panX = S.pan.panX + e.clientX - S.pan.x;
    S.panY = S.pan.panY + e.clientY - S.pan.y;
    draw();
    return;
  }
  const [row, col] = pointer(e);
  S.cursorAt = [row, col];
  showCursor(row, col);
  if (S.stroke) strokeTo(row, col);
  else draw();
});
function endPointer() {
  if (S.stroke) {
    S.stroke = null;
    updateDirty();
  }
  S.pan = null;
}
el.canvas.addEventListener("pointerup", endPointer);
el.canvas.addEventListener("pointercancel", endPointer);
el.canvas.addEventListener("pointerleave", () => { S.cursorAt = null; draw(); });
el.canvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  if (S.target && S.target.kind === "slice" && !e.ctrlKey && !e.metaKey) {
    stepSlice(e.deltaY > 0 ? 1 : -1);
    return;
  }
  const box = el.canvas.getBoundingClientRect();
  zoomAt(e.clientX - box.left, e.clientY - box.top, e.deltaY < 0 ? 1.2 : 1 / 1.2);
}, { passive: false });

function pointer(e) {
  const box = el.canvas.getBoundingClientRect();
  return screenToImage(e.clientX - box.left, e.clientY - box.top);
}

function zoomAt(x, y, factor) {
  const [row, col] = screenToImage(x, y);
  S.zoom = Math.max(0.05, Math.min(80, S.zoom * factor));
  S.panX = x - col * S.zoom * S.aspect[1];
  S.panY = y - row * S.zoom * S.aspect[0];
  draw();
}

function showCursor(row, col) {
  const r = Math.floor(row), c = Math.floor(col);
  if (r < 0 || c < 0 || r >= S.rows || c >= S.cols) { el.cursor.textContent = ""; return; }
  const i = r * S.cols + c;
  let text = `row ${r}  col ${c}  value ${S.image[i].toPrecision(4)}  class ${S.labels[i]}`;
  if (S.depth) text += `  depth ${S.depth[i]}`;
  el.cursor.textContent = text;
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" && e.target.type !== "range" && e.target.type !== "checkbox") return;
  if (e.target.tagName === "SELECT") return;
  const key = e.key, ctrl = e.ctrlKey || e.metaKey;
  if (key === " ") { S.spaceDown = true; e.preventDefault(); return; }
  if (ctrl && (key === "z" || key === "Z")) { e.preventDefault(); e.shiftKey ? redo() : undo(); return; }
  if (ctrl && (key === "y" || key === "Y")) { e.preventDefault(); redo(); return; }
  if (ctrl && (key === "s" || key === "S")) { e.preventDefault(); save(); return; }
  if (ctrl || e.altKey) return;
  const actions = {
    b: () => setTool("brush"), e: () => setTool("eraser"),
    "[": () => setSize(S.size - 1), "]": () => setSize(S.size + 1),
    d: () => { el["depth-overlay"].checked = !el["depth-overlay"].checked; toggleDepth(); },
    h: () => { el["show-labels"].checked = !el["show-labels"].checked; S.showLabels = el["show-labels"].checked; draw(); },
    f: fit, "+": () => zoomAt(el.canvas.width / 2, el.canvas.height / 2, 1.25),
    "=": () => zoomAt(el.canvas.width / 2, el.canvas.height / 2, 1.25),
    "-": () => zoomAt(el.canvas.width / 2, el.canvas.height / 2, 0.8),
    n: () => stepCase(1), p: () => stepCase(-1), a: () => stepAxis(),
    ArrowUp: () => stepSlice(1), ArrowDown: () => stepSlice(-1),
    PageUp: () => stepSlice(1), PageDown: () => stepSlice(-1),
  };
  const action = actions[key.length === 1 ? key.toLowerCase() : key];
  if (action) { e.preventDefault(); action(); return; }
  if (/^[1-9]$/.test(key)) setClass(Number(key));
});
document.addEventListener("keyup", (e) => { if (e.key === " ") S.spaceDown = false; });
window.addEventListener("resize", () => { resizeCanvas(); fit(); });
window.addEventListener("beforeunload", (e) => { if (S.dirty) { e.preventDefault(); e.returnValue = ""; } });

// ---------------------------------------------------------------- toolbar ------------------------

el["tool-brush"].onclick = () => setTool("brush");
el["tool-eraser"].onclick = () => setTool("eraser");
el.size.oninput = () => setSize(Number(el.size.value));
el.class.onchange = () => setClass(Number(el.class.value));
el.undo.onclick = undo;
el.redo.onclick = redo;
el.save.onclick = () => save();
el.delete.onclick = () => removeFile();
el.opacity.oninput = () => { S.opacity = Number(el.opacity.value); draw(); };
el["show-labels"].onchange = () => { S.showLabels = el["show-labels"].checked; draw(); };
el["depth-overlay"].onchange = toggleDepth;
el["win-low"].oninput = () => setWindow(Number(el["win-low"].value), S.high);
el["win-high"].oninput = () => setWindow(S.low, Number(el["win-high"].value));
el["win-reset"].onclick = () => setWindow(...S.defaultWindow);
el.axis.onchange = () => openTarget(S.target.case, "mip", Number(el.axis.value));
el.slice.oninput = () => openTarget(S.target.case, "slice", Number(el.slice.value));
el["goto-suggested"].onclick = () => {
  const entry = caseEntry(S.target.case);
  if (!entry || !entry.suggested_slices.length) return;
  // each press goes to the next suggested slice (--suggest N proposes several per case)
  const later = entry.suggested_slices.filter((k) => k > S.target.index);
  openTarget(S.target.case, "slice", later.length ? Math.min(...later) : Math.min(...entry.suggested_slices));
};
el["prefill-source"].onchange = () => {
  el["threshold-group"].classList.toggle("hidden", el["prefill-source"].value !== "threshold");
  applyPrefill(el["prefill-source"].value);
};
el.threshold.oninput = () => {
  S.thresholdLevel = Number(el.threshold.value);
  el["threshold-label"].textContent = S.thresholdLevel.toPrecision(4);
  clearTimeout(S.thresholdTimer);
  S.thresholdTimer = setTimeout(() => applyPrefill("threshold"), 120);
};
el["apply-prefill"].onclick = () => applyPrefill(el["prefill-source"].value);

function toggleDepth() {
  S.showDepth = el["depth-overlay"].checked;
  draw();
}

function setWindow(low, high) {
  S.low = Math.min(low, high - 1e-6);
  S.high = Math.max(high, low + 1e-6);
  el["win-low"].value = S.low;
  el["win-high"].value = S.high;
  renderBase();
  draw();
}

// ---------------------------------------------------------------- cases --------------------------

function caseEntry(caseId) {
  return S.cases.find((c) => c.case === caseId);
}

function renderCaseList() {
  el["case-list"].innerHTML = "";
  for (const entry of S.cases) {
    const li = document.createElement("li");
    li.dataset.case = entry.case;
    if (S.target && entry.case === S.target.case) li.classList.add("current");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.case;
    li.appendChild(name);
    if (S.dataset.mode === "mip") {
      for (const t of entry.targets) li.appendChild(badge(`axis ${t.index}`, t.state, t.problem));
    } else {
      const drawn = entry.targets.map((t) => t.index);
      li.appendChild(badge(drawn.length ? `slice ${drawn.join(", ")}` : "no slice", entry.state, problems(entry)));
    }
    if (entry.expected_changes != null) {
      const unsure = document.createElement("span");
      unsure.className = "unsure";
      unsure.title = "pixels the model expects you to change";
      unsure.textContent = `~${Math.round(entry.expected_changes)} px`;
      li.appendChild(unsure);
    }
    li.onclick = () => openCase(entry.case);
    el["case-list"].appendChild(li);
  }
  markUnsaved();
}

function problems(entry) {
  return entry.targets.filter((t) => t.problem).map((t) => t.problem).join("\n");
}

function badge(text, state, problem) {
  const span = document.createElement("span");
  const names = { none: "not started", partial: "drawn", valid: "validated", invalid: "invalid file" };
  span.className = "badge " + state;
  span.textContent = text;
  span.title = problem || names[state] || state;
  return span;
}

function markUnsaved() {
  for (const li of el["case-list"].children) {
    const mark = li.querySelector(".badge.unsaved");
    const current = S.target && li.dataset.case === S.target.case && S.dirty;
    if (current && !mark) li.appendChild(Object.assign(document.createElement("span"), { className: "badge unsaved", textContent: "unsaved" }));
    if (!current && mark) mark.remove();
  }
}

async function refreshCases() {
  const body = await apiJSON("/api/cases");
  S.cases = body.cases;
  S.model = body.model;
  renderCaseList();
  showModel();
}

function showModel() {
  const m = S.model;
  if (!m || !m.model) {
    el["model-status"].textContent = "model pre-fill: none" + (m && m.error ? ` (${m.error})` : "");
    return;
  }
  const total = Object.keys(m.cases).length;
  let text = `model ${m.model}: `;
  if (m.state === "failed") text += m.error;
  else if (m.state === "ready") text += `all ${total} cases predicted; least sure first`;
  else {
    const running = Object.entries(m.cases).find(([, v]) => v.state === "predicting");
    text += `predicting ${m.done}/${total}` + (running ? ` (${running[0]} ${Math.round(100 * running[1].progress)}%)` : "");
  }
  el["model-status"].textContent = text;
}

async function pollModel() {
  if (!S.model || !S.model.model || S.model.state !== "predicting") return;
  try {
    const status = await apiJSON("/api/status");
    const finished = status.done !== S.model.done || status.state !== S.model.state;
    S.model = status;
    showModel();
    if (finished) await refreshCases();
  } catch (error) {
    say(error.message, "error");
  }
  setTimeout(pollModel, 1500);
}

function openCase(caseId) {
  const entry = caseEntry(caseId);
  if (S.dataset.mode === "mip") {
    const todo = entry.targets.find((t) => t.state !== "valid");
    openTarget(caseId, "mip", (todo || entry.targets[0]).index);
  } else {
    const first = entry.suggested_slice != null ? entry.suggested_slice
      : entry.targets.length ? entry.targets[0].index : Math.floor(entry.shape[0] / 2);
    openTarget(caseId, "slice", first);
  }
}

function stepCase(step) {
  if (!S.cases.length) return;
  const at = S.cases.findIndex((c) => S.target && c.case === S.target.case);
  const next = S.cases[(at + step + S.cases.length) % S.cases.length];
  openCase(next.case);
}

function stepAxis() {
  if (!S.target || S.target.kind !== "mip") return;
  const axes = S.dataset.mip_axes, at = axes.indexOf(S.target.index);
  openTarget(S.target.case, "mip", axes[(at + 1) % axes.length]);
}

function stepSlice(step) {
  if (!S.target || S.target.kind !== "slice") return;
  const next = S.target.index + step;
  if (next >= 0 && next <= Number(el.slice.max)) openTarget(S.target.case, "slice", next);
}

// ---------------------------------------------------------------- one drawing --------------------

async function openTarget(caseId, kind, index) {
  const same = S.target && S.target.case === caseId && S.target.kind === kind && S.target.index === index;
  if (same) return;
  if (S.dirty && !confirm(`Discard the unsaved drawing of ${describe(S.target)}?`)) {
    syncViewControls();
    return;
  }
  const target = { case: caseId, kind, index };
  const request = ++S.request;
  say(`loading ${describe(target)} ...`);
  try {
    const [plane, saved, depth] = await Promise.all([
      apiBinary(targetPath(target, "plane")),
      apiBinary(targetPath(target, "annotation")),
      kind === "mip" ? apiBinary(targetPath(target, "depth")) : Promise.resolve(null),
    ]);
    if (request !== S.request) return;  // the user moved on meanwhile
    const keepView = S.target && S.target.case === caseId && S.rows === plane.meta.rows && S.cols === plane.meta.cols;
    Object.assign(S, {
      target, rows: plane.meta.rows, cols: plane.meta.cols, image: new Float32Array(plane.buffer),
      minimum: plane.meta.minimum, maximum: plane.meta.maximum, suggested: plane.meta.suggested,
      defaultWindow: [plane.meta.low, plane.meta.high], depth: depth ? new Uint16Array(depth.buffer) : null,
      depthExtent: depth ? depth.meta.depth : 1, version: saved.meta.version, fileProblem: saved.meta.problem,
      undo: [], redo: [], dirty: false, previewing: false, thresholdLevel: null,
    });
    const [sr, sc] = plane.meta.spacing, finest = Math.min(sr, sc);
    S.aspect = [sr / finest, sc / finest];
    if (!keepView || kind === "mip") { S.low = plane.meta.low; S.high = plane.meta.high; }
    configureWindowSliders();
    S.labels = saved.meta.exists && !saved.meta.problem ? new Uint8Array(saved.buffer) : new Uint8Array(S.rows * S.cols);
    S.baseline = S.labels.slice();
    renderBase();
    renderDepth();
    renderLabels();
    if (!keepView) fit(); else draw();
    syncViewControls();
    await loadHistory();
    updateButtons();
    renderCaseList();
    if (saved.meta.problem) {
      say(`the file on disk is not usable: ${saved.meta.problem} -- draw and save to replace it`, "error");
    } else if (!saved.meta.exists) {
      // the chosen start, else the next one that has this drawing (a label set may lack the case,
      // the model may not have predicted it yet)
      const chosen = el["prefill-source"].value;
      let started = false;
      if (chosen !== "empty") {
        for (const source of [chosen, ...S.chain.filter((c) => c !== chosen)]) {
          if ((started = await applyPrefill(source, true))) break;
        }
      }
      if (!started) say(`${describe(target)}: not started`);
    } else {
      say(`${describe(target)}: saved drawing loaded`);
    }
    document.body.dataset.ready = "1";
  } catch (error) {
    say(error.message, "error");
  }
}

function describe(t) {
  return t ? `${t.case} ${t.kind} ${t.index}` : "";
}

function configureWindowSliders() {
  for (const id of ["win-low", "win-high", "threshold"]) {
    el[id].min = S.minimum;
    el[id].max = S.maximum;
    el[id].step = (S.maximum - S.minimum) / 500 || 1;
  }
  el["win-low"].value = S.low;
  el["win-high"].value = S.high;
}

function syncViewControls() {
  const t = S.target;
  if (!t) return;
  el["target-name"].textContent = t.case;
  const entry = caseEntry(t.case);
  if (t.kind === "mip") {
    el.axis.value = String(t.index);
  } else {
    el.slice.max = String(entry.shape[0] - 1);
    el.slice.value = String(t.index);
    const marks = [];
    marks.push(...entry.suggested_slices);
    for (const d of entry.targets) marks.push(d.index);
    el["slice-marks"].innerHTML = marks.map((m) => `<option value="${m}"></option>`).join("");
    const drawn = entry.targets.some((d) => d.index === t.index);
    el["slice-label"].textContent = `${t.index} / ${entry.shape[0] - 1}` +
      (entry.suggested_slices.includes(t.index) ? "  \u2605 suggested" : "") + (drawn ? "  (drawn)" : "");
    el["goto-suggested"].disabled = entry.suggested_slice == null;
  }
}

async function loadHistory() {
  const select = el["prefill-source"];
  for (const option of [...select.options]) if (option.value.startsWith("history:")) option.remove();
  const { versions } = await apiJSON(targetPath(S.target, "history"));
  for (const stamp of versions.slice(0, 20)) {
    select.appendChild(new Option(`saved version ${stamp}`, `history:${stamp}`));
  }
}

async function applyPrefill(source, automatic = false) {
  if (!S.target) return;
  let path = targetPath(S.target, "prefill") + `?source=${encodeURIComponent(source)}&value=${S.cls}`;
  if (source === "threshold" && S.thresholdLevel != null) path += `&level=${S.thresholdLevel}`;
  const target = S.target;
  try {
    const { meta, buffer } = await apiBinary(path);
    if (target !== S.target) return;
    if (!S.previewing && !automatic) remember();
    S.labels = new Uint8Array(buffer);
    S.previewing = source === "threshold";
    if (meta.level != null) {
      S.thresholdLevel = meta.level;
      el.threshold.value = meta.level;
      el["threshold-label"].textContent = Number(meta.level).toPrecision(4);
    }
    if (automatic) S.baseline = S.labels.slice();
    updateDirty();
    renderLabels();
    draw();
    updateButtons();
    markUnsaved();
    say(`${describe(target)}: started from ${source}` + (automatic ? " (not saved yet)" : ""));
    return true;
  } catch (error) {
    if (automatic) return false;
    if (error.status === 409 && error.body && error.body.progress != null) {
      say(`${error.message} (${Math.round(100 * error.body.progress)}%)`);
    } else {
      say(error.message, "error");
    }
    return false;
  }
}

async function save(force = false) {
  if (!S.target || !S.labels) return;
  const target = S.target, labels = S.labels;
  const path = targetPath(target, "annotation") + `?rows=${S.rows}&cols=${S.cols}` + (force ? "&force=1" : "");
  try {
    const response = await api(path, {
      method: "PUT", body: labels,
      headers: { "Content-Type": "application/octet-stream", "X-Base-Version": S.version },
    });
    const body = await response.json();
    if (response.status === 409 && !force) {
      if (confirm(`${body.error}. Overwrite it? (the other version is kept in .history/)`)) return save(true);
      say(body.error, "error");
      return;
    }
    if (!response.ok) { say(body.error, "error"); return; }
    if (target === S.target) {
      S.version = body.version;
      S.baseline = labels.slice();
      updateDirty();
      S.fileProblem = null;
    }
    await refreshCases();
    await loadHistory();
    syncViewControls();
    updateButtons();
    say(`saved ${body.saved} (${body.state === "valid" ? "validated" : body.problem})`, body.state === "valid" ? "ok" : "error");
  } catch (error) {
    say(error.message, "error");
  }
}

async function removeFile() {
  if (!S.target || !S.version) return;
  if (!confirm(`Move ${describe(S.target)} to annotationsTr/.history/?`)) return;
  try {
    await apiJSON(targetPath(S.target, "annotation"), { method: "DELETE", headers: { "X-Base-Version": S.version } });
    S.version = "";
    S.baseline = new Uint8Array(S.labels.length);
    updateDirty();
    say(`${describe(S.target)}: file moved to .history/`);
    await refreshCases();
    await loadHistory();
    syncViewControls();
    updateButtons();
    markUnsaved();
  } catch (error) {
    say(error.message, "error");
  }
}

// ---------------------------------------------------------------- start --------------------------

async function start() {
  resizeCanvas();
  try {
    const dataset = await apiJSON("/api/dataset");
    S.dataset = dataset;
    S.cases = dataset.cases;
    S.model = dataset.model;
    document.title = `mipseg_annotate: ${dataset.name}`;
    el["dataset-name"].textContent = `${dataset.name} (${dataset.mode})`;
    el.class.innerHTML = "";
    for (const label of dataset.labels.filter((l) => l.value !== 0)) {
      const option = new Option(`${label.value}: ${label.name}`, String(label.value));
      option.style.color = "rgb(" + COLOURS[label.value % COLOURS.length].join(",") + ")";
      el.class.appendChild(option);
    }
    S.cls = dataset.labels.find((l) => l.value !== 0).value;
    el.class.classList.toggle("hidden", dataset.labels.length <= 2);
    const mip = dataset.mode === "mip";
    el["axis-group"].classList.toggle("hidden", !mip || dataset.mip_axes.length < 2);
    el["depth-group"].classList.toggle("hidden", !mip);
    el["slice-group"].classList.toggle("hidden", mip);
    el.axis.innerHTML = dataset.mip_axes.map((a) => `<option value="${a}">${a}</option>`).join("");
    const sources = [["empty", "empty"], ["threshold", "threshold of the image"]];
    for (const name of dataset.labelsets) sources.push([`labels:${name}`, `label set ${name}`]);
    if (dataset.model.model) sources.push(["model", `model ${dataset.model.model}`]);
    el["prefill-source"].innerHTML = sources.map(([v, t]) => `<option value="${v}">${t}</option>`).join("");
    // documentation/annotate.md's measurements: fewest pixels left to change first -- the case's own
    // label set (made from its other drawings), the model, the threshold (MIPs only)
    // (organ slices: the model first; a threshold is worse than an empty start there)
    const own = ["pseudo", "propagated"].filter((n) => dataset.labelsets.includes(n));
    S.chain = [...own, ...dataset.labelsets.filter((n) => !own.includes(n))].map((n) => `labels:${n}`);
    if (dataset.model.model) mip ? S.chain.push("model") : S.chain.unshift("model");
    if (mip) S.chain.push("threshold");
    const preferred = S.chain.length ? S.chain[0] : "empty";
    el["prefill-source"].value = preferred;
    el["threshold-group"].classList.toggle("hidden", preferred !== "threshold");
    setSize(1);
    renderCaseList();
    showModel();
    setTimeout(pollModel, 1500);
    if (S.cases.length) openCase(S.cases[0].case);
  } catch (error) {
    say(error.message, "error");
  }
}

start();
