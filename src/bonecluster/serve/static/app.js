// bonecluster viewer: plain JavaScript, no framework, talks only to this server's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

function pct(x) { return `${(100 * x).toFixed(0)}%`; }

// ------------------------------------------------------------------ tabs

let clustersLoaded = false;

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("panel-predict").hidden = name !== "predict";
  $("panel-clusters").hidden = name !== "clusters";
  $("panel-naming").hidden = name !== "naming";
  if (name === "clusters" && !clustersLoaded) loadClusters();
  if (name === "naming") loadNaming();
}

// ------------------------------------------------------------------ predict

async function upload(file) {
  if (!file) return;
  $("status").textContent = `Analysing ${file.name} ...`;
  $("status").className = "status";
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const result = await api("/api/predict", { method: "POST", body: form });
    render(result);
    $("status").textContent = "";
  } catch (err) {
    $("result").hidden = true;
    $("status").textContent = `Could not analyse ${file.name}: ${err.message}`;
    $("status").className = "status error";
  }
}

function render(r) {
  $("filename").textContent = r.path;
  $("image").src = r.image_url;
  const heat = $("heatmap");
  if (r.heatmap_url) {
    heat.src = r.heatmap_url;
    heat.hidden = !$("show-heatmap").checked;
    $("heatmap-note").textContent = `Grad-CAM of the stage-2 kNN distance (${r.heatmap_layer}): ` +
      "warm regions push the abnormality score up.";
  } else {
    heat.removeAttribute("src");
    heat.hidden = true;
    $("heatmap-note").textContent = "No heatmap: no stage-2 model scored this image.";
  }

  // A film unlike the run's training films still lands in a cluster; say so, and do not
  // present its body part (or its confidence) as if it were one the run knows.
  const unusual = r.in_distribution === false;
  $("ood-warning").hidden = !unusual;
  $("ood-warning").textContent = unusual ?
    `Unlike the films this run was trained on: typicality ${r.typicality.toFixed(1)}% ` +
    "(farther from its nearest training films than nearly all of them are from theirs). " +
    "The body part below is a guess, not a finding." : "";
  $("part").className = unusual ? "value doubtful" : "value";
  if (r.cluster_name !== null) {
    $("part").textContent = unusual ? `${r.cluster_name}?` : r.cluster_name;
    const typical = r.typicality == null ? "" : `, typicality ${r.typicality.toFixed(0)}%`;
    $("confidence").textContent = unusual ? `nearest cluster ${r.cluster} (out of distribution${typical})` :
      `cluster ${r.cluster}, confidence ${pct(r.confidence)}${typical}`;
  } else {
    $("part").textContent = "-";
    $("confidence").textContent = "this run has no stage-1 model";
  }

  const fill = $("gauge-fill"), mark = $("gauge-mark");
  if (r.score !== null) {
    const top = Math.max(2 * r.threshold, 1.15 * r.score, 1e-6);
    fill.style.width = pct(Math.min(r.score / top, 1));
    fill.className = r.abnormal ? "fill abnormal" : "fill normal";
    mark.style.left = pct(r.threshold / top);
    mark.hidden = false;
    $("verdict").textContent = r.abnormal ? "Flagged abnormal" : "Within normal range";
    $("verdict").className = r.abnormal ? "value abnormal-text" : "value normal-text";
    $("score").textContent = `score ${r.score.toFixed(3)} / threshold ${r.threshold.toFixed(3)} (${r.part} model)`;
    $("stage2-cluster").textContent = r.stage2_cluster === null ? "" :
      `stage-2 cluster ${r.stage2_cluster}: ${r.stage2_cluster_name}`;
  } else {
    fill.style.width = "0";
    mark.hidden = true;
    $("verdict").textContent = "-";
    $("verdict").className = "value";
    $("score").textContent = `no stage-2 model for "${r.cluster_name ?? "?"}"`;
    $("stage2-cluster").textContent = "";
  }

  const grid = $("neighbours");
  grid.replaceChildren();
  for (const n of r.neighbours) {
    const caption = `${n.cluster_name} \u00b7 ${n.similarity.toFixed(2)}`;
    grid.append(el("figure", { class: "thumb", title: `training image ${n.index}` +
        (n.body_part ? ` (labelled ${n.body_part})` : "") },
      el("img", { src: n.url, alt: `training image ${n.index}`, loading: "lazy" }),
      el("figcaption", { text: caption })));
  }
  if (!r.neighbours.length) grid.append(el("p", { class: "muted", text: "No training images available." }));
  $("result").hidden = false;
}

// ------------------------------------------------------------------ clusters

let listing = null;

async function loadClusters(keep) {
  $("clusters-status").textContent = "Loading clusters ...";
  try {
    listing = await api("/api/clusters?per_cluster=24");
    clustersLoaded = true;
    const select = $("stage-select");
    const chosen = keep || select.value;
    select.replaceChildren(...listing.stages.map((s) => el("option", { value: s.key, text: s.title })));
    if (chosen && listing.stages.some((s) => s.key === chosen)) select.value = chosen;
    $("clusters-status").textContent = listing.stages.length ? "" : "This run has no clusters.";
    renderGallery();
  } catch (err) {
    $("clusters-status").textContent = `Could not load clusters: ${err.message}`;
    $("clusters-status").className = "status error";
  }
}

function renderGallery() {
  const stage = listing.stages.find((s) => s.key === $("stage-select").value);
  const gallery = $("gallery");
  gallery.replaceChildren();
  if (!stage) return;
  $("stage-info").textContent = `${stage.clusters.length} clusters` +
    (stage.threshold !== undefined ? `, threshold ${stage.threshold.toFixed(3)}` : "") +
    (stage.images_available ? "" : " (training images unavailable)");
  for (const c of stage.clusters) gallery.append(clusterCard(stage, c));
}

function clusterCard(stage, c) {
  const input = el("input", { type: "text", maxlength: "64", value: c.name, "aria-label": `name of cluster ${c.id}` });
  const note = el("span", { class: "muted small" });
  const save = el("button", { type: "submit", text: "Save name" });
  const form = el("form", { class: "rename" }, input, save, note);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    save.disabled = true;
    note.textContent = "saving ...";
    try {
      const r = await api(c.rename_url, { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify({ name: input.value }) });
      c.name = r.name;
      input.value = r.name;
      note.textContent = "saved";
    } catch (err) {
      note.textContent = err.message;
    } finally {
      save.disabled = false;
    }
  });
  const thumbs = el("div", { class: "grid small-grid" });
  for (const index of c.images) {
    const url = listing.image_url_template.replace("{index}", String(index));
    thumbs.append(el("img", { src: url, alt: `training image ${index}`, title: `training image ${index}`,
                              loading: "lazy", class: "mini" }));
  }
  const size = c.size === null ? "" : `${c.size} images` + (c.size > c.images.length ? `, first ${c.images.length} shown` : "");
  return el("article", { class: "cluster" },
    el("header", {}, el("strong", { text: `#${c.id}` }), form, el("span", { class: "muted small", text: size })),
    thumbs);
}

// ------------------------------------------------------------------ naming flow

// The picker: key "1".."9" -> name. "other" and "mixed" are names too (a decision was made).
const PICKS = ["ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST", "other", "mixed"];
let naming = null;   // {clusters: [...largest first], current: index}

async function loadNaming() {
  $("naming-status").textContent = "Loading clusters ...";
  $("naming-status").className = "status";
  try {
    const all = await api("/api/clusters?per_cluster=0");
    const stage = all.stages.find((s) => s.key === "stage1");
    if (!stage) {
      $("naming-status").textContent = "This run has no stage-1 clusters to name.";
      $("naming-list").replaceChildren();
      return;
    }
    const clusters = [...stage.clusters].sort((a, b) => (b.size ?? 0) - (a.size ?? 0) || a.id - b.id);
    naming = { clusters, current: 0, template: all.image_url_template };
    $("naming-status").textContent = stage.images_available ? "" : "The training images are unavailable; names can still be given.";
    renderNaming();
  } catch (err) {
    $("naming-status").textContent = `Could not load clusters: ${err.message}`;
    $("naming-status").className = "status error";
  }
}

function isNamed(c) { return c.name !== `cluster-${c.id}`; }

function updateCounter() {
  const named = naming.clusters.filter(isNamed).length;
  $("naming-counter").textContent = `${named} of ${naming.clusters.length} named`;
}

function renderNaming() {
  const list = $("naming-list");
  list.replaceChildren(...naming.clusters.map((c, i) => namingCard(c, i)));
  updateCounter();
  selectCluster(naming.current, false);
}

function thumbStrip(indices, label) {
  const strip = el("div", { class: "grid small-grid" });
  for (const index of indices) {
    const url = naming.template.replace("{index}", String(index));
    strip.append(el("img", { src: url, alt: `${label} training image ${index}`, title: `training image ${index}`,
                             loading: "lazy", class: "mini" }));
  }
  return strip;
}

function namingCard(c, i) {
  const picker = el("div", { class: "picker" });
  PICKS.forEach((name, k) => {
    const button = el("button", { type: "button", "data-name": name, text: `${k + 1} ${name}` });
    button.addEventListener("click", () => { selectCluster(i, false); nameCurrent(name); });
    picker.append(button);
  });
  const card = el("article", { class: "cluster naming-card", id: `naming-${c.id}` },
    el("header", {}, el("strong", { text: `#${c.id}` }),
       el("span", { class: "current-name", text: c.name }),
       el("span", { class: "muted small", text: c.size === null ? "" : `${c.size} images` }),
       el("span", { class: "muted small note" })),
    el("div", { class: "muted small", text: "most central" }), thumbStrip(c.central || [], "central"),
    el("div", { class: "muted small", text: "edge" }), thumbStrip(c.edge || [], "edge"),
    picker);
  card.addEventListener("click", () => selectCluster(i, false));
  markCard(card, c);
  return card;
}

function markCard(card, c) {
  card.classList.toggle("named", isNamed(c));
  card.querySelector(".current-name").textContent = c.name;
  for (const b of card.querySelectorAll(".picker button")) b.classList.toggle("chosen", b.dataset.name === c.name);
}

function selectCluster(i, scroll = true) {
  if (!naming || !naming.clusters.length) return;
  naming.current = Math.max(0, Math.min(i, naming.clusters.length - 1));
  naming.clusters.forEach((c, k) => $(`naming-${c.id}`).classList.toggle("current", k === naming.current));
  if (scroll) $(`naming-${naming.clusters[naming.current].id}`).scrollIntoView({ block: "nearest" });
}

function nameCurrent(name) {
  // Move on at once, so that keys pressed in a row name clusters in a row; a cluster's saves go
  // one at a time, in order, and only the last choice made for it is shown.
  const i = naming.current, c = naming.clusters[i];
  selectCluster(i + 1);
  const card = $(`naming-${c.id}`), note = card.querySelector(".note");
  c.pending = name;
  note.textContent = `saving ${name} ...`;
  c.saving = (c.saving || Promise.resolve()).then(() => saveName(c, name, card, note));
}

async function saveName(c, name, card, note) {
  if (c.pending !== name) return;   // replaced by a later choice before it was sent
  try {
    const r = await api(c.rename_url, { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify({ name }) });
    if (c.pending !== name) return;
    c.name = r.name;
    note.textContent = "saved";
    markCard(card, c);
    updateCounter();
    clustersLoaded = false;   // the Clusters tab reloads with the new names
  } catch (err) {
    if (c.pending === name) note.textContent = err.message;
  }
}

function namingKeys(event) {
  if ($("panel-naming").hidden || !naming || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target && ["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName)) return;
  const digit = Number(event.key);
  if (Number.isInteger(digit) && digit >= 1 && digit <= PICKS.length) {
    if (!event.repeat) nameCurrent(PICKS[digit - 1]);   // a held key names one cluster, not many
  }
  else if (event.key === "ArrowDown" || event.key === "j") selectCluster(naming.current + 1);
  else if (event.key === "ArrowUp" || event.key === "k") selectCluster(naming.current - 1);
  else return;
  event.preventDefault();
}

// ------------------------------------------------------------------ start

function start() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("file").addEventListener("change", (event) => upload(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files[0]);
  });
  $("show-heatmap").addEventListener("change", (event) => {
    $("heatmap").hidden = !event.target.checked || !$("heatmap").getAttribute("src");
  });
  $("opacity").addEventListener("input", (event) => { $("heatmap").style.opacity = event.target.value / 100; });
  $("heatmap").style.opacity = $("opacity").value / 100;
  $("stage-select").addEventListener("change", renderGallery);
  document.addEventListener("keydown", namingKeys);
  api("/health").then((h) => {
    $("run").textContent = `run ${h.run} \u00b7 ${h.n_training_images} training images \u00b7 ` +
      `${h.parts.length} stage-2 part model(s)`;
  }).catch(() => { $("run").textContent = "server not reachable"; });
}

document.addEventListener("DOMContentLoaded", start);
