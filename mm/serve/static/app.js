// mm serve's page: search (text or image), zero-shot classification, captions, over the server's /v1 API.
// Plain JavaScript, no build step, nothing loaded from elsewhere. The API key (when the server asks for one) is
// kept in this browser's localStorage and sent as a Bearer token; result images are fetched with it too.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem("mm-api-key") || "";
let objectUrls = [];
const state = { zsFile: null, info: null, busy: 0 };

function setStatus(id, text, error = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", error);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey) headers["Authorization"] = "Bearer " + apiKey;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("keybar").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(response.status + ": " + detail);
  }
  return response;
}

function postJson(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function postForm(path, fields, file) {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) {
    for (const item of Array.isArray(v) ? v : [v]) form.append(k, String(item));
  }
  form.append("image", file, file.name || "image");
  return api(path, { method: "POST", body: form });
}

async function tracked(statusId, label, work) {
  state.busy += 1;
  document.body.dataset.busy = String(state.busy);
  setStatus(statusId, label + "...");
  try {
    await work();
  } catch (e) {
    setStatus(statusId, e.message, true);
  } finally {
    state.busy -= 1;
    document.body.dataset.busy = String(state.busy);
  }
}

// -- search --------------------------------------------------------------------------------------------
function clearResults() {
  objectUrls.forEach((u) => URL.revokeObjectURL(u));
  objectUrls = [];
  $("search-results").replaceChildren();
}

function hitCard(index, hit, isText) {
  const card = document.createElement("figure");
  card.className = "hit";
  card.style.margin = "0";
  card.dataset.id = hit.id;
  card.dataset.score = String(hit.score);
  card.dataset.index = index;
  if (hit.image) {
    const img = document.createElement("img");
    img.alt = hit.id;
    card.append(img);
    api(hit.image).then((r) => r.blob()).then((blob) => {
      const url = URL.createObjectURL(blob);
      objectUrls.push(url);
      img.src = url;
      img.dataset.loaded = "1";
    }).catch(() => { img.alt = "(image not found)"; img.dataset.loaded = "0"; });
  } else {
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = isText && hit.id.startsWith("LINE: ") ? hit.id.slice(6) : hit.id;
    card.append(text);
  }
  const label = document.createElement("figcaption");
  label.className = "label";
  const rank = document.createElement("span");
  rank.textContent = "#" + hit.rank;
  const score = document.createElement("b");
  score.textContent = hit.score.toFixed(3);
  label.append(rank, score);
  card.append(label);
  if (hit.image) {
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = hit.id;
    card.append(id);
  }
  return card;
}

function showHits(data) {
  clearResults();
  let n = 0;
  for (const [index, hits] of Object.entries(data.results)) {
    const kind = state.info && state.info.indexes[index] ? state.info.indexes[index].kind : "images";
    for (const hit of hits) {
      $("search-results").append(hitCard(index, hit, kind === "texts"));
      n += 1;
    }
  }
  const where = Object.keys(data.results).join(", ");
  setStatus("search-status", n + " results for " + (data.query === "image" ? "the image" : "\u201c" + data.query + "\u201d") +
    " in " + where);
}

function searchFields() {
  const fields = { k: Math.max(1, parseInt($("search-k").value, 10) || 10) };
  if ($("search-index").value) fields.index = $("search-index").value;
  return fields;
}

function searchText(event) {
  if (event) event.preventDefault();
  const text = $("search-text").value.trim();
  if (!text) return;
  tracked("search-status", "searching", async () => {
    const r = await postJson("/v1/search", Object.assign({ text }, searchFields()));
    showHits(await r.json());
  });
}

function searchImage(file) {
  preview("search-preview", file);
  tracked("search-status", "searching by image", async () => {
    const r = await postForm("/v1/search", searchFields(), file);
    showHits(await r.json());
  });
}

// -- zero-shot and captions ----------------------------------------------------------------------------
function classify() {
  const file = state.zsFile;
  const classes = $("zs-classes").value.split(",").map((c) => c.trim()).filter(Boolean);
  if (!file) { setStatus("zs-status", "choose an image"); return; }
  if (classes.length === 0) { setStatus("zs-status", "type class names, comma-separated"); return; }
  const fields = { classes: classes, k: Math.min(classes.length, 10) };
  const templates = $("zs-templates").value.trim();
  if (templates) fields.templates = templates.split("|").map((t) => t.trim()).filter(Boolean);
  tracked("zs-status", "classifying", async () => {
    const data = await (await postForm("/v1/zeroshot", fields, file)).json();
    const list = $("zs-results");
    list.replaceChildren();
    for (const l of data.labels) {
      const li = document.createElement("li");
      li.dataset.label = l.label;
      li.dataset.prob = String(l.prob);
      const name = document.createElement("span");
      name.textContent = l.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = (100 * l.prob).toFixed(1) + "%";
      const p = document.createElement("span");
      p.className = "p";
      p.textContent = (100 * l.prob).toFixed(1) + "%";
      li.append(name, bar, p);
      list.append(li);
    }
    setStatus("zs-status", data.labels.length ? "most probable: " + data.labels[0].label : "no labels");
  });
}

function caption(file) {
  preview("cap-preview", file);
  tracked("cap-status", "captioning", async () => {
    const data = await (await postForm("/v1/caption", { method: $("cap-method").value }, file)).json();
    $("cap-result").textContent = data.caption;
    setStatus("cap-status", "");
  });
}

// -- wiring --------------------------------------------------------------------------------------------
function preview(id, file) {
  const img = $(id);
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
}

function dropTarget(dropId, inputId, onFile) {
  const drop = $(dropId);
  $(inputId).addEventListener("change", (e) => { if (e.target.files[0]) onFile(e.target.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) onFile(e.dataTransfer.files[0]);
  });
}

async function loadInfo() {
  try {
    const info = await (await api("/v1/info")).json();
    state.info = info;
    const names = Object.keys(info.indexes);
    $("model").textContent = info.model + " \u00b7 " + (names.length ? names.length + " index" + (names.length > 1 ? "es" : "") : "no index");
    const select = $("search-index");
    select.replaceChildren();
    if (names.length > 1) select.append(new Option("all indexes", ""));
    names.forEach((n) => select.append(new Option(n + " (" + info.indexes[n].count + ")", n)));
    select.hidden = names.length < 2;
    $("search").hidden = names.length === 0;
    $("caption").hidden = !info.caption;
    document.body.dataset.ready = "1";
  } catch (e) {
    $("model").textContent = e.message;
  }
}

$("search-form").addEventListener("submit", searchText);
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("key").value.trim();
  localStorage.setItem("mm-api-key", apiKey);
  $("keybar").hidden = true;
  loadInfo();
});
dropTarget("search-drop", "search-file", searchImage);
dropTarget("zs-drop", "zs-file", (file) => { state.zsFile = file; preview("zs-preview", file); classify(); });
dropTarget("cap-drop", "cap-file", caption);
$("zs-classes").addEventListener("change", () => { if (state.zsFile) classify(); });
loadInfo();
