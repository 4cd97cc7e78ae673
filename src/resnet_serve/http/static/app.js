// resnet-serve web page: pick, drop or paste images; each gets a card with its Top-K bars, and
// a "why?" toggle per class that lays a Grad-CAM heatmap (POST /explain) over the preview.
// No framework and no network beyond this server. Server data is only ever set as textContent.
"use strict";

const TEXT = {
  en: {
    title: "What is in this picture?", topk: "Top", model: "Model", choose: "Choose images",
    hint: "or drop them here, or paste from the clipboard",
    random: "This server runs on random-init weights: its predictions are meaningless.",
    connecting: "Connecting…", warming: "The model is warming up…",
    status: (m) => `${displayName(m)} on ${m.device} · ${m.precision} · batch ≤ ${m.max_batch_size} · ${m.dispatch} dispatch · weights: ${m.weights}`,
    classifying: "Classifying…", inference: "inference", roundTrip: "round trip", batch: "batch",
    cached: "from the cache (same image as before)",
    preview: (name) => `Preview of ${name}`, unshown: (format) => `No preview: this browser cannot show ${format || "this format"}.`, langButton: "中文", langLabel: "切换到中文",
    why: "why?", whyLabel: (label) => `Show where the model looked for ${label}`, opacity: "Heatmap opacity",
    explaining: "Explaining…", heatmap: (label) => `Heatmap: where the model looked for ${label}`,
    errors: {
      not_image: "This file is not an image.",
      too_large: (mb) => `This file is larger than the ${mb} MB limit.`,
      payload_too_large: "The image is too large.",
      unsupported_media_type: "This file is not an image format the server understands.",
      invalid_image: "The image is damaged or empty.",
      overloaded: "The server is busy. Please try again in a moment.",
      not_ready: "The model is still loading. Please try again in a moment.",
      deadline_exceeded: "The server took too long to answer. Please try again.",
      upload_timeout: "The upload took too long.",
      network: "Could not reach the server.",
      explanations_unavailable: "This server cannot explain its predictions (it needs the torch extra).",
      other: "Something went wrong",
    },
  },
  zh: {
    title: "这张图片里是什么？", topk: "前", model: "模型", choose: "选择图片",
    hint: "或拖放到这里，或从剪贴板粘贴",
    random: "此服务使用随机初始化的权重：预测结果没有意义。",
    connecting: "正在连接…", warming: "模型正在预热…",
    status: (m) => `${displayName(m)} · 设备 ${m.device} · 精度 ${m.precision} · 批大小 ≤ ${m.max_batch_size} · ${m.dispatch} 调度 · 权重：${m.weights}`,
    classifying: "识别中…", inference: "推理", roundTrip: "往返", batch: "批",
    cached: "来自缓存（与之前的图片相同）",
    preview: (name) => `${name} 的预览`, unshown: (format) => `无法预览：此浏览器不能显示${format ? ` ${format}` : "此格式"}。`, langButton: "English", langLabel: "Switch to English",
    why: "为什么？", whyLabel: (label) => `显示模型判断为「${label}」时关注的区域`, opacity: "热力图不透明度",
    explaining: "正在解释…", heatmap: (label) => `热力图：模型判断为「${label}」时关注的区域`,
    errors: {
      not_image: "这个文件不是图片。",
      too_large: (mb) => `文件超过 ${mb} MB 的上限。`,
      payload_too_large: "图片太大。",
      unsupported_media_type: "服务器无法识别这种文件格式。",
      invalid_image: "图片已损坏或为空。",
      overloaded: "服务器繁忙，请稍后再试。",
      not_ready: "模型仍在加载，请稍后再试。",
      deadline_exceeded: "服务器响应超时，请重试。",
      upload_timeout: "上传超时。",
      network: "无法连接到服务器。",
      explanations_unavailable: "此服务器无法解释预测结果（需要安装 torch 扩展）。",
      other: "出错了",
    },
  },
};

const state = {
  lang: localStorage.getItem("resnet-serve-lang") || (navigator.language.startsWith("zh") ? "zh" : "en"),
  topK: Number(localStorage.getItem("resnet-serve-topk") || 3),
  model: null,        // /model of the chosen model
  chosen: null,       // its name; null: the server's default
  maxBytes: 10 * 1024 * 1024,
  cards: [],
};

// The built-in model by its proper name; a user's model by its own name and architecture.
function displayName(m) {
  return m.name === "resnet18" && m.architecture === "resnet18" ? "ResNet-18" : `${m.name} (${m.architecture})`;
}

function modelQuery(name = state.chosen) {
  return name ? `&model=${encodeURIComponent(name)}` : "";
}

const $ = (id) => document.getElementById(id);
const t = () => TEXT[state.lang];

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  for (const node of document.querySelectorAll("[data-i18n]")) {
    const value = t()[node.dataset.i18n];
    if (typeof value === "string") node.textContent = value;
  }
  const button = $("lang");
  button.textContent = t().langButton;
  button.setAttribute("aria-label", t().langLabel);
  renderStatus();
  state.cards.forEach(renderCard);
}

function renderStatus() {
  const m = state.model;
  $("status").textContent = m ? t().status(m) : t().connecting;
  $("random-banner").hidden = !(m && m.weights === "random-init");
}

// A picker appears when the server serves more than one model; names are set as text only.
async function loadModels() {
  try {
    const response = await fetch("/models");
    if (!response.ok) return;
    const listing = await response.json();
    const ready = listing.models.filter((m) => m.state === "READY");
    const select = $("model");
    select.replaceChildren(...ready.map((m) => {
      const option = element("option", "", m.name);
      option.value = m.name;
      return option;
    }));
    state.chosen = state.chosen || listing.default;
    select.value = state.chosen;
    $("model-picker").hidden = ready.length < 2;
  } catch {
    // the status line reports an unreachable server
  }
}

async function loadModel() {
  try {
    const response = await fetch(`/model?${modelQuery().slice(1)}`);
    if (response.ok) {
      state.model = await response.json();
      state.maxBytes = state.model.max_upload_mb * 1024 * 1024;
      renderStatus();
      return;
    }
    $("status").textContent = t().warming;
  } catch {
    $("status").textContent = t().errors.network;
  }
  setTimeout(refresh, 1000);
}

async function refresh() {
  await loadModels();
  await loadModel();
}

function errorText(card) {
  const errors = t().errors;
  if (card.error === "too_large") return errors.too_large(state.maxBytes / 1024 / 1024);
  const known = errors[card.error];
  return known || `${errors.other}: ${card.errorMessage || card.error}`;
}

function labelOf(p) {
  return state.lang === "zh" ? p.label_zh : p.label_en;
}

// The "why?" overlay: the heatmap PNG (the photo's own size) laid over the preview, both drawn
// with object-fit: contain in the same box, so they line up; its opacity follows the slider.
function renderOverlay(card) {
  const heat = card.node.querySelector("img.heat");
  const shown = card.explained !== null && card.heatmaps[card.explained];
  heat.hidden = !shown;
  if (shown) {
    heat.src = card.heatmaps[card.explained].src;
    heat.alt = t().heatmap(card.heatmaps[card.explained].label);
    heat.style.opacity = String(card.opacity);
  }
}

async function explain(card, p) {
  if (card.explained === p.class_id) {
    card.explained = null;
    renderCard(card);
    return;
  }
  card.explained = p.class_id;
  card.explainError = null;
  if (!card.heatmaps[p.class_id]) {
    card.explaining = true;
    renderCard(card);
    const form = new FormData();
    form.append("file", card.file, card.name);
    try {
      const response = await fetch(`/explain?class_id=${p.class_id}${modelQuery(card.model)}`, { method: "POST", body: form });
      const body = await response.json().catch(() => null);
      if (response.ok && body) {
        card.heatmaps[p.class_id] = { src: `data:image/png;base64,${body.explanations[0].heatmap_png}`, label: labelOf(p) };
      } else {
        card.explained = null;
        card.explainError = { code: (body && body.error && body.error.code) || `http_${response.status}`,
                              message: body && body.error ? body.error.message : response.statusText };
      }
    } catch {
      card.explained = null;
      card.explainError = { code: "network" };
    }
    card.explaining = false;
  }
  renderCard(card);
}

function whyButton(card, p) {
  const button = element("button", "why", t().why);
  button.type = "button";
  button.setAttribute("aria-pressed", String(card.explained === p.class_id));
  button.setAttribute("aria-label", t().whyLabel(labelOf(p)));
  button.addEventListener("click", () => explain(card, p));
  return button;
}

function opacitySlider(card) {
  const wrap = element("label", "opacity");
  wrap.append(element("span", "", t().opacity));
  const range = element("input");
  range.type = "range";
  range.min = "0";
  range.max = "1";
  range.step = "0.05";
  range.value = String(card.opacity);
  range.addEventListener("input", (e) => {
    card.opacity = Number(e.target.value);
    renderOverlay(card);
  });
  wrap.append(range);
  return wrap;
}

function renderCard(card) {
  const body = card.node.querySelector(".body");
  body.replaceChildren(element("h2", "", card.name));
  const photo = card.node.querySelector("img.photo");
  photo.alt = t().preview(card.name);
  photo.hidden = card.unshown;
  const unshown = card.node.querySelector(".unshown");
  unshown.hidden = !card.unshown;
  unshown.textContent = t().unshown(card.result ? card.result.image.format : null);
  card.node.querySelector(".preview").hidden = !card.previewed || (card.unshown && card.error !== null);
  renderOverlay(card);
  if (card.error) {
    body.append(element("p", "error", errorText(card)));
    return;
  }
  if (!card.result) {
    body.append(element("p", "pending", t().classifying));
    return;
  }
  const list = element("ol", "predictions");
  for (const p of card.result.predictions) {
    const item = element("li", "prediction");
    const row = element("div", "row");
    const pct = (p.confidence * 100).toFixed(1) + "%";
    row.append(element("span", "label", labelOf(p)), element("span", "pct", pct), whyButton(card, p));
    const track = element("div", "track");
    track.setAttribute("role", "img");
    track.setAttribute("aria-label", pct);
    const fill = element("div", "fill");
    fill.style.width = `${Math.max(0.5, p.confidence * 100)}%`;
    track.append(fill);
    item.append(row, track);
    list.append(item);
  }
  const r = card.result;
  const work = r.cached ? t().cached : `${t().inference} ${r.inference_time_ms.toFixed(1)} ms`;
  const times = element("p", "times",
    `${work} · ${t().roundTrip} ${card.roundTripMs.toFixed(0)} ms` + (r.cached ? "" : ` · ${t().batch} ${r.batch_size}`)
    + ($("model-picker").hidden ? "" : ` · ${r.model}`));
  body.append(list, times);
  if (card.explaining) body.append(element("p", "pending", t().explaining));
  if (card.explainError) {
    const known = t().errors[card.explainError.code];
    body.append(element("p", "error", known || `${t().errors.other}: ${card.explainError.message || card.explainError.code}`));
  }
  if (card.explained !== null && card.heatmaps[card.explained]) body.append(opacitySlider(card));
}

async function classify(file) {
  // A type the browser does not know ("" or the generic binary type) may still be an image the
  // server reads (HEIC on many systems): only a type known not to be an image is refused here.
  const image = ["", "application/octet-stream"].includes(file.type) || file.type.startsWith("image/");
  const card = { name: file.name || "pasted image", result: null, error: null, node: element("article", "card"),
                 file, model: state.chosen, explained: null, heatmaps: {}, opacity: 0.6, explaining: false,
                 explainError: null, previewed: image, unshown: false };
  const preview = element("div", "preview");
  const img = element("img", "photo");
  const unshown = element("p", "unshown");  // an image the server reads but the browser cannot show (TIFF, HEIC)
  const heat = element("img", "heat");
  heat.hidden = true;
  img.addEventListener("error", () => { card.unshown = true; renderCard(card); });
  if (image) img.src = URL.createObjectURL(file);
  preview.append(img, unshown, heat);
  card.node.append(preview, element("div", "body"));
  $("results").prepend(card.node);
  state.cards.push(card);
  if (!image) card.error = "not_image";
  else if (file.size > state.maxBytes) card.error = "too_large";
  renderCard(card);
  if (card.error) return;

  const form = new FormData();
  form.append("file", file, card.name);
  const started = performance.now();
  try {
    const response = await fetch(`/predict?top_k=${state.topK}&lang=${state.lang}${modelQuery(card.model)}`, { method: "POST", body: form });
    card.roundTripMs = performance.now() - started;
    const body = await response.json().catch(() => null);
    if (response.ok && body) card.result = body;
    else {
      card.error = (body && body.error && body.error.code) || `http_${response.status}`;
      card.errorMessage = body && body.error ? body.error.message : response.statusText;
    }
  } catch {
    card.error = "network";
  }
  renderCard(card);
}

function classifyAll(files) {
  $("page-error").hidden = true;
  for (const file of files) classify(file);
}

function setUp() {
  $("topk").value = String(state.topK);
  $("topk").addEventListener("change", (e) => {
    state.topK = Number(e.target.value);
    localStorage.setItem("resnet-serve-topk", String(state.topK));
  });
  $("lang").addEventListener("click", () => {
    state.lang = state.lang === "zh" ? "en" : "zh";
    localStorage.setItem("resnet-serve-lang", state.lang);
    applyLanguage();
  });
  $("file").addEventListener("change", (e) => {
    classifyAll([...e.target.files]);
    e.target.value = "";
  });
  // Files dropped anywhere on the page are classified: a drop that misses the zone would
  // otherwise make the browser open the file in place of the page, and every card with it.
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, () => drop.classList.add("over"));
    document.addEventListener(type, (e) => e.preventDefault());
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const files = [...(e.dataTransfer ? e.dataTransfer.files : [])];
    if (files.length) classifyAll(files);
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (!files.length) return;  // text pasted into a field stays text
    e.preventDefault();
    classifyAll(files);
  });
  $("model").addEventListener("change", (e) => {
    state.chosen = e.target.value;
    loadModel();
  });
  applyLanguage();
  refresh();
}

document.addEventListener("DOMContentLoaded", setUp);
