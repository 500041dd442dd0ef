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
    $("#live-text-form").hidden = !h.tts;
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
  const liveSel = $("#live-avatar"), liveKeep = liveSel.value;
  liveSel.replaceChildren(...[...sel.options].map((o) => new Option(o.text, o.value)));
  if (ready.some((a) => a.name === liveKeep)) liveSel.value = liveKeep;
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
  sel.replaceChildren(new Option("last (default)", ""));
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

// ---- live -----------------------------------------------------------------------------------
// Speech goes to /api/live/{avatar} as 16 kHz s16le PCM (routes_live.py has the protocol); JPEG
// frames come back stamped with their stream time t and are shown when the audio clock reaches
// live.clock0 + t. Audio the page plays (a file, the server's speech) is scheduled on the same clock,
// so voice and picture stay together; the microphone is not played back.
const LIVE_SR = 16000;
const LIVE_CHUNK_S = 0.1;     // s of audio per message
const LIVE_MARGIN_S = 0.3;    // s added to the stream's own delay for the server's work and the network (later frames show as they come)
const live = { ws: null, ctx: null, hello: null, clock0: 0, pending: null, decode: Promise.resolve(), queue: [],
  shown: 0, dropped: 0, arrivals: [], sent: 0, mic: null, file: null, worklet: false, timer: null, ended: "" };

// The microphone's samples to the page in blocks of ~40 ms (an AudioWorklet runs beside the page, on the audio thread)
const TAP_WORKLET = `class PcmTap extends AudioWorkletProcessor {
  constructor() { super(); this.buf = new Float32Array(2048); this.n = 0; }
  process(inputs) {
    const ch = inputs[0][0];
    if (ch) {
      this.buf.set(ch, this.n);
      this.n += ch.length;
      if (this.n > this.buf.length - 128) { this.port.postMessage(this.buf.slice(0, this.n)); this.n = 0; }
    }
    return true;
  }
}
registerProcessor("pcm-tap", PcmTap);`;

function downsampler(rate) {
  // Streaming rate -> 16 kHz: each output sample averages the input samples it spans (a box low-pass)
  const step = rate / LIVE_SR;
  let rest = new Float32Array(0), pos = 0;
  return (input) => {
    const x = new Float32Array(rest.length + input.length);
    x.set(rest);
    x.set(input, rest.length);
    const out = new Float32Array(Math.max(0, Math.floor((x.length - pos) / step)) + 1);   // +1: float rounding of pos
    let n = 0;
    for (; pos + step <= x.length; pos += step) {
      const a = Math.floor(pos), b = Math.max(a + 1, Math.floor(pos + step));
      let s = 0;
      for (let j = a; j < b; j++) s += x[j];
      out[n++] = s / (b - a);
    }
    const keep = Math.floor(pos);
    rest = x.slice(keep);
    pos -= keep;
    return out.subarray(0, n);
  };
}

function toPcm16(x) {
  const v = new DataView(new ArrayBuffer(2 * x.length));
  for (let i = 0; i < x.length; i++) v.setInt16(2 * i, Math.round(32767 * Math.max(-1, Math.min(1, x[i]))), true);
  return v.buffer;
}

function liveSend(x) {
  if (!live.ws || live.ws.readyState !== WebSocket.OPEN) return;
  live.ws.send(toPcm16(x));
  live.sent += x.length;
}

function playAt(samples, time, offset = 0) {
  // 16 kHz samples from `offset` s on, at stream time `time` (the part already past is skipped) -> the source
  const ctx = live.ctx;
  let when = live.clock0 + time;
  if (when < ctx.currentTime) {
    offset += ctx.currentTime - when;
    when = ctx.currentTime;
  }
  if (offset * LIVE_SR >= samples.length) return null;
  const buf = ctx.createBuffer(1, samples.length, LIVE_SR);
  buf.copyToChannel(samples, 0);
  const src = ctx.createBufferSource();
  src.buffer = buf;
  src.connect(ctx.destination);
  src.start(when, offset);
  return src;
}

function liveHeard(m) {
  // our PCM from sample m.sample on plays from stream time m.time: the file's sound follows it there
  const f = live.file;
  if (!f || m.sample < f.first || m.sample >= f.first + f.pcm.length) return;
  if (f.source) f.source.stop();
  f.source = playAt(f.pcm, m.time, (m.sample - f.first) / LIVE_SR);
}

function liveBinary(data) {
  const head = live.pending;
  live.pending = null;
  if (!head) return;
  if (head.type === "audio") {
    const s16 = new Int16Array(data), x = new Float32Array(s16.length);
    for (let i = 0; i < s16.length; i++) x[i] = s16[i] / 32768;
    playAt(x, head.time);
    return;
  }
  live.arrivals.push(performance.now());
  live.dropped = head.dropped;
  // decoded one after another, so frames stay in order
  live.decode = live.decode.then(() => createImageBitmap(new Blob([data], { type: "image/jpeg" })))
    .then((bitmap) => live.queue.push({ time: head.time, bitmap }))
    .catch((e) => message(`frame ${head.index} could not be decoded (${e.message})`));
}

function liveMessage(ev, started) {
  if (typeof ev.data !== "string") {
    liveBinary(ev.data);
    return;
  }
  const m = JSON.parse(ev.data);
  if (m.type === "hello") {
    live.hello = m;
    live.clock0 = live.ctx.currentTime + m.delay + LIVE_MARGIN_S;
    const c = $("#live-canvas");
    c.width = m.width;
    c.height = m.height;
    $("#live-text-form").hidden = !m.tts;
    started();
  } else if (m.type === "frame" || m.type === "audio") {
    live.pending = m;
  } else if (m.type === "heard") {
    liveHeard(m);
  } else if (m.type === "error") {
    message(m.detail);
  } else if (m.type === "end") {
    live.dropped = m.dropped;
    live.ended = `Stream ended: ${m.frames} frames made, ${m.dropped} dropped.`;
  }
}

function liveDraw() {
  // the newest frame whose time has come; older ones are passed over
  if (!live.ctx) return;
  const now = live.ctx.currentTime;
  let due = null;
  while (live.queue.length && live.clock0 + live.queue[0].time <= now) {
    if (due) due.bitmap.close();
    due = live.queue.shift();
  }
  if (due) {
    const c = $("#live-canvas");
    c.getContext("2d").drawImage(due.bitmap, 0, 0, c.width, c.height);
    due.bitmap.close();
    live.shown += 1;
    c.dataset.frames = String(live.shown);
  }
  if (live.ws || live.queue.length) requestAnimationFrame(liveDraw);
}

function liveStatus() {
  const t = performance.now();
  live.arrivals = live.arrivals.filter((a) => t - a < 1000);
  if (live.ws && live.hello) {
    $("#live-status").textContent = `Live: delay ${(live.hello.delay + LIVE_MARGIN_S).toFixed(2)} s ` +
      `(${live.hello.delay.toFixed(2)} s of look-ahead), ${live.arrivals.length} fps received, ` +
      `${live.dropped} frames dropped, ${live.shown} shown.`;
  }
}

function liveConnect() {
  // the socket, once the server's hello has come
  const name = $("#live-avatar").value;
  if (!name) return Promise.reject(new Error("choose a trained avatar for the live stream first"));
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const key = state.key ? `?key=${encodeURIComponent(state.key)}` : "";
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${proto}://${location.host}/api/live/${encodeURIComponent(name)}${key}`);
    ws.binaryType = "arraybuffer";
    let open = false;
    ws.onmessage = (ev) => liveMessage(ev, () => { open = true; resolve(); });
    ws.onclose = (ev) => {
      if (ev.code === 4401) $("#key-section").hidden = false;
      liveEnded();
      if (!open) reject(new Error(ev.reason || "the live stream could not start (is the server running?)"));
      else if (ev.code !== 1000 && ev.reason) message(ev.reason);
    };
    live.ws = ws;
    live.shown = live.dropped = 0;
    live.ended = "";
    $("#live-avatar").disabled = true;
    $("#live-stop-btn").disabled = false;
    $("#live-status").textContent = "Connecting…";
    clearInterval(live.timer);
    live.timer = setInterval(liveStatus, 500);
  });
}

async function liveStart() {
  // the audio clock (made on this click: browsers start audio only on a user action) and the socket
  if (!live.ctx) live.ctx = new AudioContext();
  await live.ctx.resume();
  liveStopSources();
  if (!live.ws) {
    await liveConnect();
    requestAnimationFrame(liveDraw);
  }
}

async function liveMic() {
  await liveStart();
  const ctx = live.ctx;
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  if (!live.worklet) {
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([TAP_WORKLET], { type: "application/javascript" })));
    live.worklet = true;
  }
  const src = ctx.createMediaStreamSource(stream);
  const tap = new AudioWorkletNode(ctx, "pcm-tap", { channelCount: 1, channelCountMode: "explicit" });
  const down = downsampler(ctx.sampleRate);
  let parts = [], n = 0;
  tap.port.onmessage = (e) => {
    const x = down(e.data);
    parts.push(x);
    n += x.length;
    if (n >= LIVE_CHUNK_S * LIVE_SR) {
      const all = new Float32Array(n);
      let o = 0;
      for (const p of parts) { all.set(p, o); o += p.length; }
      liveSend(all);
      parts = [];
      n = 0;
    }
  };
  src.connect(tap);
  tap.connect(ctx.destination);     // the tap outputs silence; connected so that it is processed
  live.mic = { stream, src, tap };
  $("#live-mic-btn").textContent = "Microphone on";
}

async function liveFile() {
  const file = $("#live-file").files[0];
  if (!file) throw new Error("choose an audio file to play into the stream");
  await liveStart();
  let decoded;
  try {
    decoded = await live.ctx.decodeAudioData(await file.arrayBuffer());
  } catch (e) {
    throw new Error(`${file.name}: this browser cannot decode its audio`);
  }
  const off = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * LIVE_SR)), LIVE_SR);
  const src = off.createBufferSource();
  src.buffer = decoded;
  src.connect(off.destination);
  src.start();
  const pcm = (await off.startRendering()).getChannelData(0);
  const f = { pcm, first: live.sent, source: null, timer: null };
  const chunk = LIVE_CHUNK_S * LIVE_SR, t0 = performance.now();
  let i = 0;
  f.timer = setInterval(() => {       // real-time pace, one chunk ahead
    const due = ((performance.now() - t0) / 1000 + LIVE_CHUNK_S) * LIVE_SR;
    for (; i < pcm.length && i < due; i += chunk) liveSend(pcm.subarray(i, i + chunk));
    if (i >= pcm.length) clearInterval(f.timer);
  }, 50);
  live.file = f;
}

function liveStopSources() {
  if (live.mic) {
    live.mic.stream.getTracks().forEach((tr) => tr.stop());
    live.mic.src.disconnect();
    live.mic.tap.disconnect();
    live.mic = null;
    $("#live-mic-btn").textContent = "Start microphone";
  }
  if (live.file) {
    clearInterval(live.file.timer);
    if (live.file.source) live.file.source.stop();
    live.file = null;
  }
}

function liveStop() {
  // no more audio: the server sends the last frames and closes
  liveStopSources();
  if (live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify({ type: "end" }));
  $("#live-stop-btn").disabled = true;
}

function liveEnded() {
  liveStopSources();
  live.ws = null;
  clearInterval(live.timer);
  $("#live-avatar").disabled = false;
  $("#live-stop-btn").disabled = true;
  $("#live-status").textContent = live.ended || "Not streaming.";
}

function liveAction(fn) {
  return async (ev) => {
    if (ev) ev.preventDefault();
    try {
      await fn();
    } catch (e) {
      message(e.message);
    }
  };
}

function liveSay() {
  const text = $("#live-text").value.trim();
  if (!text) throw new Error("type something to say");
  return liveStart().then(() => {
    live.ws.send(JSON.stringify({ type: "text", text }));
    $("#live-text").value = "";
  });
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
    if (photo && $("#other-person").checked) form.append("other_person", "true");
    const g = $("#guidance").value.trim();
    if (g) {
      if (!(Number(g) >= 0 && Number(g) <= 4)) throw new Error("mouth movement: give a number from 0 to 4 (or leave it empty)");
      form.append("guidance", g);
    }
    const sh = $("#sharpen").value.trim();
    if (sh) {
      if (!(Number(sh) >= 0 && Number(sh) <= 4)) throw new Error("mouth sharpening: give a number from 0 to 4 (or leave it empty)");
      form.append("sharpen", sh);
    }
    const bp = $("#band-push").value.trim();
    if (bp) {
      if (!(Number(bp) >= 0 && Number(bp) <= 1)) throw new Error("another person's voice: give a number from 0 to 1 (or leave it empty)");
      form.append("band_push", bp);
    }
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
    form.append("voice", $("#voice").value || "others");
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
  $("#live-mic-btn").addEventListener("click", liveAction(liveMic));
  $("#live-file-btn").addEventListener("click", liveAction(liveFile));
  $("#live-stop-btn").addEventListener("click", liveStop);
  $("#live-text-form").addEventListener("submit", liveAction(liveSay));
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
