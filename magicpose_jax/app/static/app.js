// The page of `python -m magicpose_jax.app`: uploads the inputs to a job, runs its tasks, polls its state.
// The job's id is in the URL (?job=ID), so a reload (or another browser) finds the job and its results again.
"use strict";

const $ = (id) => document.getElementById(id);
let job = null;          // the job's state, as the server last sent it
let inputsChanged = true; // the chosen files differ from the job's uploads: the next press starts a new job
let polling = null;

async function api(method, url, body) {
  const response = await fetch(url, {method, body});
  const payload = await response.json();
  if (!response.ok) throw new Error(payload.error || response.statusText);
  return payload;
}

function options() {
  return JSON.stringify({
    align: $("align").checked, fps: Number($("fps").value), max_frames: Number($("max-frames").value),
    steps: Number($("steps").value), guidance: Number($("guidance").value), seed: Number($("seed").value),
  });
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function upload() {
  const reference = $("reference-input").files[0];
  const driving = Array.from($("driving-input").files);
  if (!reference) throw new Error("choose a reference photo");
  if (!driving.length) throw new Error("choose a driving video or OpenPose .json files");
  const state = await api("POST", "/api/jobs");
  const put = (role, file) => api("PUT", `/api/jobs/${state.id}/inputs/${role}?name=${encodeURIComponent(file.name)}`,
                                  file);
  await put("reference", reference);
  const jsons = driving.filter((f) => f.name.toLowerCase().endsWith(".json"));
  if (jsons.length) {
    for (const f of jsons) await put("pose", f);
  } else {
    await put("driving", driving[0]);
  }
  history.replaceState(null, "", `?job=${state.id}`);
  inputsChanged = false;
  return state.id;
}

async function run(task) {
  showError("");
  setBusy(true);
  try {
    const id = (inputsChanged || !job) ? await upload() : job.id;
    render(await api("POST", `/api/jobs/${id}/run/${task}`, options()));
    poll(id);
  } catch (e) {
    showError(e.message);
    setBusy(false);
  }
}

function setBusy(busy) {
  $("poses-button").disabled = busy;
  $("animate-button").disabled = busy;
}

function poll(id) {
  clearTimeout(polling);
  const tick = async () => {
    try {
      const state = await api("GET", `/api/jobs/${id}`);
      render(state);
      if (state.status === "queued" || state.status === "running") polling = setTimeout(tick, 400);
    } catch (e) {
      showError(e.message);
      setBusy(false);
    }
  };
  tick();
}

function setSource(element, name) {
  const url = name ? `/jobs/${job.id}/${name}?t=${job.created}-${name}-${job.finished || ""}` : "";
  if (element.dataset.name !== url) {
    element.dataset.name = url;
    if (url) element.src = url; else element.removeAttribute("src");
  }
}

function render(state) {
  job = state;
  const active = state.status === "queued" || state.status === "running";
  setBusy(active);
  const files = state.files || {};
  job.finished = [files.poses, files.video, state.status].join("-");
  setSource($("reference-view"), files.reference);
  setSource($("poses-view"), files.poses);
  setSource($("aligned-view"), files.aligned);
  const hasVideo = Boolean(files.video) && state.status !== "running";
  $("result").hidden = !hasVideo;
  setSource($("result-video"), hasVideo ? files.video : null);
  setSource($("side-video"), hasVideo ? files.side_by_side : null);
  if (hasVideo) {
    $("download").href = `/jobs/${state.id}/${files.video}`;
    $("side-download").href = `/jobs/${state.id}/${files.side_by_side}`;
  }
  const progress = $("progress");
  progress.max = Math.max(state.total || 0, 1);
  progress.value = state.status === "done" ? progress.max : (state.done || 0);
  let status = state.status;
  if (state.status === "queued") status = `queued (${state.queue_position} ahead)`;
  else if (state.status === "running") {
    status = state.stage + (state.total ? ` ${state.done}/${state.total}` : "");
  } else if (state.status === "done") status = `done: ${state.task}`;
  $("status").textContent = status;
  showError(state.status === "error" ? state.error : "");
  const report = state.report;
  $("pose-report").textContent = report ? poseReport(report) : "";
  $("job-link").innerHTML = `job <a href="?job=${state.id}">${state.id}</a>: results are kept on the server, ` +
                            "this page can be reloaded";
}

function poseReport(report) {
  const parts = [`${report.frames} frames`];
  if (report.no_person && report.no_person.length) parts.push(`no person in frames ${report.no_person.join(", ")}`);
  if (report.align && report.align.scales) {
    const s = Object.values(report.align.scales);
    parts.push(`aligned on frame ${report.align.anchor_frame}, limb scales ${Math.min(...s).toFixed(2)}–` +
               `${Math.max(...s).toFixed(2)}`);
  }
  return parts.join("; ");
}

async function init() {
  const info = await api("GET", "/api/info");
  const d = info.defaults;
  $("fps").value = d.fps; $("max-frames").value = d.max_frames; $("steps").value = d.steps;
  $("guidance").value = d.guidance; $("seed").value = d.seed; $("align").checked = d.align;
  const describe = (i) => i.model === "ready"
      ? `model: ${i.checkpoint} (${i.stage}, step ${i.step}, ${i.image_size.join("×")} px)` +
        (i.base ? `, base ${i.base}` : "")
      : i.model === "error" ? `model error: ${i.error}` : `model: ${i.checkpoint} (loading…)`;
  $("model-info").textContent = describe(info);
  if (info.model === "loading") {
    const again = async () => {
      const i = await api("GET", "/api/info");
      $("model-info").textContent = describe(i);
      if (i.model === "loading") setTimeout(again, 1000);
    };
    setTimeout(again, 1000);
  }
  for (const id of ["reference-input", "driving-input"]) {
    $(id).addEventListener("change", () => { inputsChanged = true; });
  }
  $("reference-input").addEventListener("change", () => {
    const file = $("reference-input").files[0];
    if (file) { $("reference-view").src = URL.createObjectURL(file); $("reference-view").dataset.name = ""; }
  });
  $("poses-button").addEventListener("click", () => run("poses"));
  $("animate-button").addEventListener("click", () => run("animate"));
  const id = new URLSearchParams(location.search).get("job");
  if (id) {
    inputsChanged = false;
    poll(id);
  }
}

init().catch((e) => showError(e.message));
