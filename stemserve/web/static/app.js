// The stemserve page: upload a track, follow its job, then play and download the stems.
// Plain JavaScript, no build step. Talks only to the JSON job API described at /docs.
"use strict";

const MB = 1 << 20;
const POLL_MS = 500;
const DRIFT_S = 0.05; // stems further apart than this are pulled back to the first one
const AHEAD_ALPHA = 0.4;
const $ = (selector) => document.querySelector(selector);

let config = null;
let player = null;

function clock(seconds) {
  const whole = Math.max(0, Math.floor(seconds || 0));
  return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
}

// ------------------------------------------------------------------------------------------
// Messages

function showError(message) {
  $("#status").hidden = true;
  $("#error").textContent = message;
  $("#error").hidden = false;
}

// `stage`, next to the bar: what the server does now (uploading, queued, preparing the
// model, separating, encoding the stems, zipping the stems).
function showStatus(text, fraction, stage) {
  $("#error").hidden = true;
  $("#status").hidden = false;
  $("#status-text").textContent = text;
  $("#status-stage").textContent = stage;
  const bar = $("#status-bar");
  if (fraction === null) bar.removeAttribute("value"); // indeterminate
  else bar.value = fraction;
}

// Every refusal answers {"detail": "..."}.
function errorDetail(text, status) {
  try {
    const detail = JSON.parse(text).detail;
    if (typeof detail === "string") return detail;
  } catch (err) {
    // not JSON: fall through
  }
  return `the server answered ${status}`;
}

// ------------------------------------------------------------------------------------------
// Form

function fillSelect(select, values, chosen, label = (value) => value, title = () => "") {
  for (const value of values) {
    const option = new Option(label(value), value);
    option.selected = value === chosen;
    option.title = title(value);
    select.add(option);
  }
}

const FORMAT_LABELS = {
  wav: "WAV 16-bit", wav24: "WAV 24-bit", wav32f: "WAV 32-bit float",
  flac: "FLAC 16-bit", flac24: "FLAC 24-bit", mp3: "MP3 320 kb/s",
};
const formatLabel = (name) => FORMAT_LABELS[name] || name;

// A model as the page names it: with the checkpoint (and its sha256) and precision that
// separate, where known (the default model from the start, any model once its job runs).
function modelLabel(name, info) {
  if (!info) return `model ${name}`;
  return `model ${name} (${info.family_title || info.family}, ${info.precision}, ` +
    `checkpoint ${info.checkpoint}, sha256 ${info.checkpoint_sha256.slice(0, 12)})`;
}

function showModelInfo() {
  const name = $("#model").value;
  $("#model-info").textContent = name === config.default_model ?
    `Separates with ${modelLabel(name, config.model_info)} ` +
    `${config.backend === "triton" ? "on Triton" : "in-process"}.` :
    `Separates with ${modelLabel(name)}, prepared on its first job.`;
}

// The two-stems choices of the chosen model (a 6-source model adds guitar and piano).
function fillStems() {
  const sources = config.model_sources[$("#model").value] || config.sources;
  const select = $("#two-stems");
  const chosen = select.value;
  select.length = 1;  // keep "all stems"
  select.options[0].textContent = `all ${sources.length}`;
  fillSelect(select, sources, sources.includes(chosen) ? chosen : null,
             (stem) => `${stem} + no_${stem}`);
}

async function loadConfig() {
  let response = await fetch("/api/config");
  if (response.status === 401) {
    await logIn();
    response = await fetch("/api/config");
  }
  if (!response.ok) throw new Error(errorDetail(await response.text(), response.status));
  config = await response.json();
  // Each model with what it is (a release or a local file, family, sha256), so that a
  // local file named like a release is never taken for it.
  const about = (name) => config.model_descriptions[name] || "";
  fillSelect($("#model"), config.models, config.default_model,
             (name) => about(name) ? `${name}: ${about(name)}` : name, about);
  fillStems();
  showModelInfo();
  $("#model").addEventListener("change", () => {
    fillStems();
    showModelInfo();
  });
  fillSelect($("#format"), config.formats, config.default_format, formatLabel);
  $("#shifts").value = config.default_shifts;
  $("#shifts").max = config.max_shifts;
  $("#limits").textContent = `Up to ${config.max_upload_mb} MB and ` +
    `${clock(config.max_duration)} per track: WAV, FLAC, MP3, OGG/Opus, AIFF or whatever ` +
    "else libsndfile reads.";
}

// ------------------------------------------------------------------------------------------
// Token: a server started with one answers 401 until the page logs in. The server keeps the
// token in an HttpOnly cookie, which the audio players and download links send as well.

function logIn() {
  $("#upload").hidden = true;
  $("#login").hidden = false;
  $("#token").focus();
  return new Promise((resolve) => {
    const form = $("#login-form");
    form.addEventListener("submit", async function submit(event) {
      event.preventDefault();
      const response = await fetch("/api/login", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({token: $("#token").value}),
      });
      if (!response.ok) {
        $("#login-error").textContent = errorDetail(await response.text(), response.status);
        $("#login-error").hidden = false;
        return;
      }
      form.removeEventListener("submit", submit);
      $("#login").hidden = true;
      $("#upload").hidden = false;
      resolve();
    });
  });
}

function wireUpload() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (event) => {
    if (event.target.files.length) upload(event.target.files[0]);
    event.target.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]);
  });
}

function upload(file) {
  if (file.size > config.max_upload_mb * MB) {
    showError(`${file.name} is ${(file.size / MB).toFixed(1)} MB: uploads are limited to ` +
              `${config.max_upload_mb} MB.`);
    return;
  }
  const form = new FormData();
  form.append("file", file);
  form.append("model", $("#model").value);
  if ($("#two-stems").value) form.append("two_stems", $("#two-stems").value);
  form.append("shifts", $("#shifts").value || "0");
  form.append("format", $("#format").value);

  const request = new XMLHttpRequest();
  request.open("POST", "/api/jobs");
  request.upload.addEventListener("progress", (event) => {
    const fraction = event.lengthComputable ? event.loaded / event.total : null;
    showStatus(`Uploading ${file.name}: ${fraction === null ? "" :
                Math.round(fraction * 100) + " %"}`, fraction, "uploading");
  });
  request.addEventListener("load", () => {
    if (request.status === 202) follow(JSON.parse(request.responseText));
    else showError(`Upload refused: ${errorDetail(request.responseText, request.status)}`);
  });
  request.addEventListener("error", () => {
    showError(`The upload of ${file.name} failed: the server could not be reached.`);
  });
  showStatus(`Uploading ${file.name}`, 0, "uploading");
  request.send(form);
}

// ------------------------------------------------------------------------------------------
// Following a job (its id in the address, so a reload or a shared link finds it again)

// [text, fraction of the bar (null: indeterminate), stage beside the bar]
function describe(job) {
  if (job.state === "queued") {
    return [`${job.name} is waiting in the queue: position ${job.position}.`, null, "queued"];
  }
  const stage = job.stage_text || "starting";
  if (job.state === "running" && job.stage === "preparing") {
    return [`Preparing ${job.model} for ${job.name} (a model's first job may export it, ` +
            "which takes minutes)", null, stage];
  }
  if (job.state === "running" && job.stage === "encoding") {
    return [`Encoding the stems of ${job.name}: ${Math.round(100 * job.stage_progress)} %`,
            job.stage_progress, stage];
  }
  if (job.state === "running" && job.stage === "zipping") {
    return [`Zipping the stems of ${job.name}`, null, stage];
  }
  if (job.state === "running") {
    return [`Separating ${job.name}: ${job.progress.toFixed(1)} s of ` +
            `${job.seconds.toFixed(1)} s`, job.seconds ? job.progress / job.seconds : null,
            stage];
  }
  return [`${job.name}: ${job.state}`, 1, job.state];
}

let followed = 0; // a newer upload stops following the older job

async function follow(job) {
  const turn = ++followed;
  history.replaceState(null, "", `#${job.id}`);
  if (player) player.destroy();
  player = null;
  $("#result").hidden = true;
  while (job.state === "queued" || job.state === "running") {
    showStatus(...describe(job));
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (turn !== followed) return;
    const response = await fetch(`/api/jobs/${encodeURIComponent(job.id)}`);
    if (!response.ok) {
      showError(errorDetail(await response.text(), response.status));
      return;
    }
    job = await response.json();
  }
  if (turn !== followed) return;
  if (job.state === "failed") {
    showError(`Separation of ${job.name} failed: ${job.error}`);
    return;
  }
  $("#status").hidden = true;
  player = new Player(job);
}

// ------------------------------------------------------------------------------------------
// Player: one transport for every stem, mute and solo per stem, a waveform of each

class Player {
  constructor(job) {
    this.rows = [];
    this.playing = false;
    $("#track-name").textContent = job.name;
    $("#track-info").textContent = [
      `${clock(job.seconds)}`, modelLabel(job.model, job.model_info),
      job.two_stems ? `${job.two_stems} + no_${job.two_stems}` : `${job.stems.length} stems`,
      job.shifts ? `${job.shifts} shifts` : null, formatLabel(job.format),
    ].filter(Boolean).join(" · ");
    $("#zip").href = job.zip_url;
    $("#tracks").replaceChildren();
    const tracks = job.stems.map((stem) => ({name: stem.name, url: stem.url}));
    if (job.mix_url) tracks.unshift({name: "mix", url: job.mix_url, muted: true});
    for (const track of tracks) this.addRow(track);
    this.master = this.rows.find((row) => row.name !== "mix") || this.rows[0];

    this.onFrame = this.onFrame.bind(this);
    this.master.audio.addEventListener("loadedmetadata", () => this.updateTime());
    this.master.audio.addEventListener("ended", () => this.pause());
    this.controller = new AbortController();
    const signal = this.controller.signal;
    $("#play").addEventListener("click", () => (this.playing ? this.pause() : this.play()),
                                {signal});
    $("#seek").addEventListener("input", (event) => this.seek(Number(event.target.value)),
                                {signal});
    document.addEventListener("keydown", (event) => {
      if (event.code === "Space" && event.target === document.body) {
        event.preventDefault();
        this.playing ? this.pause() : this.play();
      }
    }, {signal});
    window.addEventListener("resize", () => this.draw(), {signal});
    $("#result").hidden = false;
    this.applyMutes();
    this.loadWaveforms();
  }

  addRow(track) {
    const node = $("#track-row").content.firstElementChild.cloneNode(true);
    const row = {
      name: track.name, node, muted: Boolean(track.muted), solo: false, peaks: null, top: 0,
      audio: node.querySelector("audio"), canvas: node.querySelector("canvas"), url: track.url,
    };
    node.dataset.stem = track.name;
    node.querySelector(".name").textContent = track.name;
    node.querySelector(".name").title = track.name; // the whole name where it is cut short
    row.audio.src = track.url;
    node.querySelector(".download").href = track.url;
    node.querySelector(".mute").addEventListener("click", () => {
      // A soloed row is heard, so its M is off: pressing it mutes the row and ends its solo.
      row.muted = row.solo || !row.muted;
      row.solo = false;
      this.applyMutes();
    });
    node.querySelector(".solo").addEventListener("click", () => {
      row.solo = !row.solo;
      this.applyMutes();
    });
    row.canvas.addEventListener("click", (event) => {
      const box = row.canvas.getBoundingClientRect();
      this.seek((event.clientX - box.left) / box.width * this.duration());
    });
    $("#tracks").append(node);
    this.rows.push(row);
  }

  // A soloed stem silences every stem not soloed; otherwise mute decides. The buttons show
  // what is so: M is lit on a row muted and not soloed (a soloed row is heard, and its mute
  // comes back with the solo's end), S on a soloed row.
  applyMutes() {
    const soloing = this.rows.some((row) => row.solo);
    for (const row of this.rows) {
      const audible = soloing ? row.solo : !row.muted;
      row.audio.muted = !audible;
      row.node.classList.toggle("silent", !audible);
      row.node.querySelector(".mute").setAttribute("aria-pressed",
                                                   String(row.muted && !row.solo));
      row.node.querySelector(".solo").setAttribute("aria-pressed", String(row.solo));
    }
  }

  duration() {
    const duration = this.master.audio.duration;
    return Number.isFinite(duration) ? duration : 0;
  }

  async play() {
    const start = this.master.audio.currentTime;
    for (const row of this.rows) row.audio.currentTime = start;
    this.playing = true;
    $("#play").innerHTML = "&#10074;&#10074;";
    $("#play").setAttribute("aria-label", "Pause");
    requestAnimationFrame(this.onFrame);
    try {
      await Promise.all(this.rows.map((row) => row.audio.play()));
    } catch (err) {
      this.pause();
      showError(`Playback failed: ${err.message}`);
    }
  }

  pause() {
    for (const row of this.rows) row.audio.pause();
    this.playing = false;
    $("#play").innerHTML = "&#9654;";
    $("#play").setAttribute("aria-label", "Play");
    this.draw();
  }

  seek(seconds) {
    const target = Math.min(Math.max(seconds, 0), this.duration());
    for (const row of this.rows) row.audio.currentTime = target;
    this.updateTime(target);
    this.draw(target);
  }

  // While playing: keep every stem on the first one's clock, move the playhead.
  onFrame() {
    if (!this.playing) return;
    const now = this.master.audio.currentTime;
    for (const row of this.rows) {
      if (row !== this.master && Math.abs(row.audio.currentTime - now) > DRIFT_S) {
        row.audio.currentTime = now;
      }
    }
    this.updateTime(now);
    this.draw(now);
    requestAnimationFrame(this.onFrame);
  }

  updateTime(now = this.master.audio.currentTime) {
    const seek = $("#seek");
    seek.max = this.duration();
    seek.value = now;
    $("#time").textContent = `${clock(now)} / ${clock(this.duration())}`;
  }

  // Decoded one at a time: a long track's samples are large, and only the peaks are kept.
  async loadWaveforms() {
    const context = new OfflineAudioContext(1, 1, 44100);
    for (const row of this.rows) {
      try {
        const response = await fetch(row.url);
        const audio = await context.decodeAudioData(await response.arrayBuffer());
        row.peaks = peaks(audio, 2000);
        row.top = Math.max(...row.peaks);
      } catch (err) {
        row.peaks = [];
        row.canvas.title = "no waveform: this browser cannot decode the file";
      }
      this.draw();
    }
  }

  // One scale for all rows, so that a quiet stem looks quiet next to a loud one.
  draw(now = this.master.audio.currentTime) {
    const fraction = this.duration() ? now / this.duration() : 0;
    const top = Math.max(0, ...this.rows.map((row) => row.top));
    for (const row of this.rows) drawWave(row.canvas, row.peaks, top || 1, fraction);
  }

  destroy() {
    this.pause();
    this.controller.abort();
    for (const row of this.rows) row.audio.removeAttribute("src");
  }
}

// Largest absolute sample of each of `count` slices of the track, over all channels.
function peaks(buffer, count) {
  const out = new Float32Array(count);
  const slice = Math.max(1, Math.floor(buffer.length / count));
  for (let channel = 0; channel < buffer.numberOfChannels; channel++) {
    const data = buffer.getChannelData(channel);
    for (let index = 0; index < count; index++) {
      let peak = out[index];
      const end = Math.min(data.length, (index + 1) * slice);
      for (let sample = index * slice; sample < end; sample++) {
        const value = Math.abs(data[sample]);
        if (value > peak) peak = value;
      }
      out[index] = peak;
    }
  }
  return out;
}

function drawWave(canvas, values, top, fraction) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const height = Math.round(canvas.clientHeight * ratio);
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, width, height);
  // The stem's colour comes from the stylesheet; what is still to play is drawn fainter.
  context.fillStyle = getComputedStyle(canvas).getPropertyValue("--color").trim();
  const middle = height / 2;
  if (!values || !values.length) {
    context.globalAlpha = AHEAD_ALPHA;
    context.fillRect(0, middle - ratio / 2, width, ratio);
  } else {
    for (let x = 0; x < width; x++) {
      const value = values[Math.floor(x / width * values.length)] / top;
      const half = Math.max(ratio / 2, value * (middle - ratio));
      context.globalAlpha = x / width < fraction ? 1 : AHEAD_ALPHA;
      context.fillRect(x, middle - half, 1, 2 * half);
    }
  }
  context.globalAlpha = 1;
  context.fillRect(Math.round(fraction * width), 0, Math.max(1, ratio), height);
}

// ------------------------------------------------------------------------------------------

async function start() {
  wireUpload();
  try {
    await loadConfig();
  } catch (err) {
    showError(`The server did not answer: ${err.message}`);
    return;
  }
  const jobId = location.hash.slice(1);
  if (jobId) {
    const response = await fetch(`/api/jobs/${encodeURIComponent(jobId)}`);
    if (response.ok) follow(await response.json());
    else showError(errorDetail(await response.text(), response.status));
  }
}

start();
