// The page: plain JS over the JSON API (see /docs). Every API error shows its `detail` text.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { key: localStorage.getItem("lipsync-api-key") || "", health: null, watching: null, timer: null };
const POLL_MS = 1000, LIST_MS = 4000;

// ---- messages ------------------------------------------------------------------------------
function message(text, kind = "error") {
  const box = document.createElement("div");
  box.className = `msg ${kind}`;
  const span = document.createElement("span");
  span.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.setAttribute("aria-label", "dismiss message");
  close.onclick = () => box.remove();
  box.append(span, close);
  $("#messages").prepend(box);
  if (kind === "info") setTimeout(() => box.remove(), 8000);
}

function detailText(status, body) {
  // FastAPI: {"detail": "text"} or, for validation errors, {"detail": [{loc, msg}, ...]}
  const d = body && body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(-1)[0] || "input"}: ${e.msg}`).join("; ");
  return `the server answered ${status}`;
}

// ---- API -----------------------------------------------------------------------------------
async function api(method, url) {
  const headers = state.key ? { "X-API-Key": state.key } : {};
  let r;
  try {
    r = await fetch(url, { method, headers });
  } catch (e) {
    throw new Error("the server cannot be reached; is it running?");
  }
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    if (r.status === 401) $("#key-section").hidden = false;
    throw new Error(detailText(r.status, body));
  }
  return body;
}

function upload(url, form, bar) {
  // XHR rather than fetch: it reports upload progress for large videos
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    if (state.key) xhr.setRequestHeader("X-API-Key", state.key);
    if (bar) {
      bar.hidden = false;
      bar.value = 0;
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
    }
    xhr.onload = () => {
      if (bar) bar.hidden = true;
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        if (xhr.status === 401) $("#key-section").hidden = false;
        reject(new Error(detailText(xhr.status, body)));
      }
    };
    xhr.onerror = () => {
      if (bar) bar.hidden = true;
      reject(new Error("the upload failed: the server closed the connection (is the file too large?)"));
    };
    xhr.send(form);
  });
}

function checkSizes(files) {
  const mb = state.health && state.health.limits.max_upload_mb;
  for (const f of files) {
    if (f && mb && f.size > mb * 1048576) {
      throw new Error(`${f.name} is ${(f.size / 1048576).toFixed(1)} MB; the server accepts up to ${mb} MB per file`);
    }
  }
}

// ---- status --------------------------------------------------------------------------------
async function loadHealth() {
  try {
    const h = await api("GET", "/health");
    state.health = h;
    if (!h.device) {   // an API key is set and not (yet) given: the server says no more than that
      $("#health").textContent = "Server ready; it needs its API key.";
      $("#key-section").hidden = false;
      return;
    }
    $("#health").textContent = `Server ready on ${h.device}. ${h.queue_length} job(s) waiting` +
      (h.running ? ", one running." : ".");
    $("#key-section").hidden = !(h.auth_required && !state.key) && $("#key-section").hidden;
    $("#text-field").hidden = !h.tts;
    const preset = $("#preset");
    if (!preset.options.length) {
      for (const [name, p] of Object.entries(h.presets)) {
        preset.add(new Option(`${name}: ${p.widths} network, ${p.steps} steps`, name));
      }
    }
  } catch (e) {
    $("#health").textContent = `Server not reachable: ${e.message}`;
  }
}

async function loadAvatars() {
  let avatars;
  try {
    avatars = await api("GET", "/api/avatars");
  } catch (e) {
    message(e.message);
    return;
  }
  const sel = $("#avatar"), keep = sel.value;
  sel.replaceChildren();
  const ready = avatars.filter((a) => a.ready);
  if (!ready.length) sel.add(new Option("no trained avatar yet: create one below", ""));
  for (const a of ready) sel.add(new Option(a.name, a.name));
  if (ready.some((a) => a.name === keep)) sel.value = keep;
  fillCheckpoints(avatars);
  sel.onchange = () => fillCheckpoints(avatars);
  const list = $("#avatar-list");
  list.replaceChildren();
  for (const a of avatars) {
    const li = document.createElement("li");
    const d = a.dataset;
    const facts = d && d.frames ? `${d.frames} frames, ${d.duration} s, ${d.width}x${d.height}` : "no dataset yet";
    const cks = a.checkpoints.map((c) => `${c.file}${c.step != null ? ` (step ${c.step})` : ""}`).join(", ");
    li.textContent = `${a.name}: ${facts}; ` + (a.ready ? `checkpoints ${cks}` : a.job ? "being trained" : "not trained");
    if (!a.job) li.append(" ", deleteButton(`avatar ${a.name}`, `/api/avatars/${encodeURIComponent(a.name)}`,
      `Delete avatar ${a.name}: its dataset and checkpoints?`));
    list.append(li);
  }
  if (!avatars.length) list.append(Object.assign(document.createElement("li"), { textContent: "none yet" }));
}

function fillCheckpoints(avatars) {
  const a = avatars.find((x) => x.name === $("#avatar").value);
  const sel = $("#checkpoint");
  sel.replaceChildren(new Option("best (default)", ""));
  for (const c of (a ? a.checkpoints : [])) {
    sel.add(new Option(`${c.file}${c.step != null ? ` (step ${c.step})` : ""}`, c.file));
  }
}

function fmtTime(t) {
  return t ? new Date(t * 1000).toLocaleString() : "";
}

function fmtEta(s) {
  if (s == null) return "";
  if (s < 90) return `about ${Math.round(s)} s left`;
  return `about ${Math.round(s / 60)} min left`;
}

function deleteButton(what, url, question) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "delete";
  b.textContent = "Delete";
  b.setAttribute("aria-label", `delete ${what}`);
  b.onclick = async () => {
    if (!window.confirm(question)) return;
    try {
      await api("DELETE", url);
      message(`${what} deleted`);
    } catch (e) {
      message(e.message);
    }
    refresh();
  };
  return b;
}

async function loadJobs() {
  let jobs;
  try {
    jobs = await api("GET", "/api/jobs?limit=50");
  } catch (e) {
    return;   // the health line already says when the server is unreachable
  }
  const tbody = $("#jobs tbody");
  tbody.replaceChildren();
  for (const j of jobs) {
    const tr = document.createElement("tr");
    const what = j.kind === "generate" ? (j.request.audio || (j.request.text ? "text" : "")) : j.request.video || "";
    const cells = [fmtTime(j.created), j.kind, j.avatar, j.status, `${j.progress.toFixed(0)}%`,
      j.error || (j.status === "running" ? `${j.stage} ${fmtEta(j.eta_s)}` : j.status === "queued" ? `#${j.queue_position} in queue` : what)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 3) td.className = `status-${j.status}`;
      if (i === 5 && j.error) td.className = "err";
      tr.append(td);
    });
    const td = document.createElement("td");
    if (j.result_url) {
      const play = document.createElement("button");
      play.type = "button";
      play.textContent = "Play";
      play.setAttribute("aria-label", `play the result of job ${j.id.slice(0, 8)}`);
      play.onclick = () => watch(j.id);
      const dl = document.createElement("a");
      dl.href = j.result_url;
      dl.download = `${j.avatar}_${j.id.slice(0, 8)}.mp4`;
      dl.textContent = " download";
      td.append(play, dl);
      td.append(" ", deleteButton(`job ${j.id.slice(0, 8)}`, `/api/jobs/${j.id}`, "Delete this job and its video?"));
    } else if (j.status === "queued" || j.status === "running") {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = j.id === state.watching ? "Watching" : "Watch";
      b.onclick = () => watch(j.id);
      td.append(b);
    }
    tr.append(td);
    tbody.append(tr);
  }
}

// ---- the watched job ------------------------------------------------------------------------
function watch(jobId) {
  state.watching = jobId;
  clearTimeout(state.timer);
  $("#job-section").hidden = false;
  $("#result").hidden = true;
  const v = $("#result-video");
  v.removeAttribute("src");
  v.load();
  poll();
}

async function poll() {
  const id = state.watching;
  if (!id) return;
  let j;
  try {
    j = await api("GET", `/api/jobs/${id}`);
  } catch (e) {
    message(e.message);
    state.timer = setTimeout(poll, 3 * POLL_MS);
    return;
  }
  if (id !== state.watching) return;
  const label = j.kind === "generate" ? `Video for ${j.avatar}` : `Avatar ${j.avatar}`;
  let line = `${label}: ${j.status}`;
  if (j.status === "running") line += ` — ${j.stage} ${fmtEta(j.eta_s)}`;
  if (j.status === "queued") line += ` (#${j.queue_position} in queue)`;
  if (j.error) line += ` — ${j.error}`;
  $("#job-line").textContent = line;
  $("#job-progress").value = j.progress;
  $("#job-pct").textContent = `${j.progress.toFixed(0)}%`;
  $("#cancel-btn").hidden = !(j.status === "queued" || j.status === "running");
  if (j.status === "queued" || j.status === "running") {
    state.timer = setTimeout(poll, POLL_MS);
    return;
  }
  if (j.status === "done" && j.result_url) {
    const v = $("#result-video");
    if (v.getAttribute("src") !== j.result_url) v.src = j.result_url;
    const a = $("#download-link");
    a.href = j.result_url;
    a.download = `${j.avatar}_${j.id.slice(0, 8)}.mp4`;
    $("#result").hidden = false;
    message(`${label} is ready.`, "info");
  } else if (j.status === "done") {
    message(`${label} is ready.`, "info");
    loadAvatars();
  } else if (j.status === "failed") {
    message(`${label} failed: ${j.error}`);
  }
  loadJobs();
}

// ---- forms ----------------------------------------------------------------------------------
function clearMessages() {
  $("#messages").replaceChildren();
}

async function submitGenerate(ev) {
  ev.preventDefault();
  clearMessages();
  const form = new FormData();
  const audio = $("#audio").files[0], photo = $("#template").files[0], text = $("#text").value.trim();
  const btn = $("#generate-btn");
  try {
    if (!$("#avatar").value) throw new Error("choose an avatar first (or create one below)");
    if (!audio && !text) throw new Error("choose an audio file with speech" + (state.health && state.health.tts ? " or type text" : ""));
    checkSizes([audio, photo]);
    form.append("avatar", $("#avatar").value);
    if ($("#checkpoint").value) form.append("checkpoint", $("#checkpoint").value);
    if (audio) form.append("audio", audio);
    else form.append("text", text);
    if (photo) form.append("template", photo);
    btn.disabled = true;
    const job = await upload("/api/generate", form, null);
    message("Job queued.", "info");
    watch(job.id);
    loadJobs();
  } catch (e) {
    message(e.message);
  } finally {
    btn.disabled = false;
  }
}

async function submitAvatar(ev) {
  ev.preventDefault();
  clearMessages();
  const video = $("#new-video").files[0], btn = $("#avatar-btn");
  try {
    if (!video) throw new Error("choose a video of the person talking");
    checkSizes([video]);
    const form = new FormData();
    form.append("name", $("#new-name").value.trim());
    form.append("video", video);
    form.append("preset", $("#preset").value || "quick");
    if ($("#steps").value) form.append("steps", $("#steps").value);
    btn.disabled = true;
    const job = await upload("/api/avatars", form, $("#upload-progress"));
    message(`Avatar ${job.avatar} queued for training.`, "info");
    watch(job.id);
    loadJobs();
    loadAvatars();
  } catch (e) {
    message(e.message);
  } finally {
    btn.disabled = false;
  }
}

async function cancelWatched() {
  if (!state.watching) return;
  try {
    await api("POST", `/api/jobs/${state.watching}/cancel`);
    message("Cancel requested.", "info");
    poll();
  } catch (e) {
    message(e.message);
  }
}

function init() {
  $("#generate-form").addEventListener("submit", submitGenerate);
  $("#avatar-form").addEventListener("submit", submitAvatar);
  $("#cancel-btn").addEventListener("click", cancelWatched);
  $("#api-key").value = state.key;
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("#api-key").value.trim();
    localStorage.setItem("lipsync-api-key", state.key);
    $("#key-section").hidden = true;
    refresh();
  });
  $("#result-video").addEventListener("error", () => {
    if ($("#result-video").getAttribute("src")) message("the video could not be loaded from the server");
  });
  refresh();
  setInterval(() => { loadHealth(); loadJobs(); }, LIST_MS);
}

async function refresh() {
  await loadHealth();
  await Promise.all([loadAvatars(), loadJobs()]);
}

init();
