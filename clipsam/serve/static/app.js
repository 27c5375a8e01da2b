// clipsam serve's page: upload an image, show the mask over it, re-threshold the scores live.
// No external resources; the API calls carry the bearer token when one is set.
"use strict";

const TINT = [255, 0, 0];       // mask fill colour
const TINT_ALPHA = 0.45;        // mask fill opacity
const CONTOUR = [255, 215, 0];  // mask outline colour
const MIN_DISPLAY_WIDTH = 480;  // CSS pixels: smaller images are shown scaled up

const view = {
  image: null,        // HTMLImageElement of the upload
  scores: null,       // Uint8Array (H*W) of round(255 * fused score)
  serverMask: null,   // Uint8Array (H*W) of the server's mask (0/1)
  serverLevel: 0,     // the slider level of the bundle's pixel threshold, round(255 * t)
  result: null,       // the last JSON answer
  width: 0,
  height: 0,
};

const $ = (id) => document.getElementById(id);

function token() {
  return sessionStorage.getItem("clipsam-token") || "";
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

function setState(state) {
  document.body.dataset.state = state;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || body.status || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function checkHealth() {
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const body = await response.json();
    $("health").textContent = response.ok ? "model ready" : "model " + body.status;
    return response.ok;
  } catch (e) {
    $("health").textContent = "server unreachable";
    return false;
  }
}

async function loadInfo() {
  const response = await fetch("/info", { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401) {
    $("token-row").hidden = false;
    setStatus("This server needs a bearer token.", true);
    return;
  }
  if (!response.ok) {
    setStatus("GET /info: " + (await errorText(response)), true);
    return;
  }
  const info = await response.json();
  const select = $("category");
  select.length = 1;
  const several = ((info.serve && info.serve.categories) || []).length > 1;
  select.options[0].textContent = several && !info.serve.default_category ? "(choose a category)" : "(server default)";
  for (const name of (info.serve && info.serve.categories) || []) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    if (info.serve.default_category === name) option.selected = true;
    select.appendChild(option);
  }
}

async function waitUntilReady() {
  while (!(await checkHealth())) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  await loadInfo();
}

function decodePng(base64, width, height) {
  // One channel of a base64 PNG, as a Uint8Array (H*W).
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = width;
      canvas.height = height;
      const ctx = canvas.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(img, 0, 0);
      const rgba = ctx.getImageData(0, 0, width, height).data;
      const out = new Uint8Array(width * height);
      for (let i = 0; i < out.length; i++) out[i] = rgba[4 * i];
      resolve(out);
    };
    img.onerror = () => reject(new Error("could not decode the server's PNG"));
    img.src = "data:image/png;base64," + base64;
  });
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this file"));
    img.src = URL.createObjectURL(file);
  });
}

function currentMask() {
  // The server's mask at its own threshold; the slider's threshold once it is moved.
  const level = Number($("threshold").value);
  if (view.serverMask && level === view.serverLevel) return view.serverMask;
  const mask = new Uint8Array(view.scores.length);
  for (let i = 0; i < mask.length; i++) mask[i] = view.scores[i] >= level ? 1 : 0;
  return mask;
}

function thresholdText() {
  // The bundle's own threshold when the slider is at it; else the slider's level / 255.
  const level = Number($("threshold").value);
  if (view.result && level === view.serverLevel) return Number(view.result.pixel_threshold).toFixed(3) + " (bundle)";
  return (level / 255).toFixed(3);
}

function render() {
  const { width, height } = view;
  const canvas = $("overlay");
  canvas.width = width;
  canvas.height = height;
  canvas.style.width = Math.max(width, MIN_DISPLAY_WIDTH) + "px";  // small images shown enlarged
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(view.image, 0, 0, width, height);
  const frame = ctx.getImageData(0, 0, width, height);
  const px = frame.data;
  const mask = currentMask();
  let count = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if (!mask[i]) continue;
      count++;
      const edge = x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
        !mask[i - 1] || !mask[i + 1] || !mask[i - width] || !mask[i + width];
      const p = 4 * i;
      if (edge) {
        px[p] = CONTOUR[0]; px[p + 1] = CONTOUR[1]; px[p + 2] = CONTOUR[2];
      } else {
        for (let c = 0; c < 3; c++) px[p + c] = Math.round(px[p + c] * (1 - TINT_ALPHA) + TINT[c] * TINT_ALPHA);
      }
    }
  }
  ctx.putImageData(frame, 0, 0);
  canvas.dataset.maskPixels = String(count);
  const share = (100 * count / (width * height)).toFixed(2);
  const shown = thresholdText();
  $("mask-info").textContent = `mask: ${count} pixels (${share}%) at threshold ${shown}`;
  $("threshold-value").textContent = shown;
}

function showResult(result) {
  const label = $("label");
  label.textContent = result.label ? "ANOMALOUS" : "normal";
  label.className = "badge " + (result.label ? "anomalous" : "normal");
  const fmt = (v) => (v === null || v === undefined ? "n/a" : Number(v).toFixed(3));
  $("score").textContent = `image score ${fmt(result.image_score)} (threshold ${fmt(result.image_threshold)}) · ` +
    `${result.category} · ${result.num_regions} region(s) · ${Math.round(result.elapsed_ms)} ms`;
  view.serverLevel = Math.round(255 * result.pixel_threshold);
  $("threshold").value = String(view.serverLevel);
  $("result").hidden = false;
  render();
}

async function segment(file) {
  setState("busy");
  setStatus("segmenting " + file.name + "…");
  try {
    const form = new FormData();
    form.append("image", file, file.name);
    const category = $("category").value;
    if (category) form.append("category", category);
    const [image, response] = await Promise.all([
      loadImage(file),
      fetch("/segment", { method: "POST", body: form, headers: authHeaders() }),
    ]);
    if (response.status === 401) $("token-row").hidden = false;
    if (!response.ok) throw new Error(await errorText(response));
    const result = await response.json();
    view.image = image;
    view.result = result;
    view.width = result.width;
    view.height = result.height;
    [view.scores, view.serverMask] = await Promise.all([
      decodePng(result.scores_png, result.width, result.height),
      decodePng(result.mask_png, result.width, result.height).then((m) => m.map((v) => (v ? 1 : 0))),
    ]);
    showResult(result);
    setStatus(file.name + ": done");
    setState("done");
  } catch (e) {
    setStatus(file.name + ": " + e.message, true);
    setState("error");
  }
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = "";  // choosing the same file again is a new upload
    if (file) segment(file);
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) segment(file);
  });
  $("threshold").addEventListener("input", () => { if (view.scores) render(); });
  $("threshold-reset").addEventListener("click", () => {
    $("threshold").value = String(view.serverLevel);
    if (view.scores) render();
  });
  $("token-save").addEventListener("click", () => {
    sessionStorage.setItem("clipsam-token", $("token").value.trim());
    $("token-row").hidden = true;
    setStatus("");
    loadInfo();
  });
  waitUntilReady();
}

document.addEventListener("DOMContentLoaded", setup);
