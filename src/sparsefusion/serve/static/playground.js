// The playground: pick run(s) and checkpoint, prompt, sampling settings; POST /generate; show the
// samples as the model emitted them (text, images inline, audio players) with time and tokens/s.
"use strict";

const NUMBER_FIELDS = ["temperature", "top_p", "seed", "num_samples", "max_new_tokens"];
const GUIDED_MODES = ["text_to_image", "text_to_speech"];  // modes whose spans CFG applies to
let RUNS = [];

function fillSelect(select, options) {
  select.replaceChildren(...options.map(([value, label]) => el("option", {value}, label)));
}

function fillCheckpoints(runSelect, checkpointSelect) {
  const run = RUNS.find((r) => r.name === runSelect.value);
  const steps = run ? [...run.checkpoints].reverse() : [];
  fillSelect(checkpointSelect, [["", "latest"], ...steps.map((s) => [String(s), `step ${s}`])]);
}

async function fillModes() {
  const mode = document.getElementById("mode");
  const run = document.getElementById("run").value;
  const checkpoint = document.getElementById("checkpoint").value;
  const status = document.getElementById("status");
  try {
    const query = checkpoint ? `?checkpoint=${encodeURIComponent(checkpoint)}` : "";
    const data = await getJSON(`/runs/${encodeURIComponent(run)}/modes${query}`);
    const keep = mode.value;
    fillSelect(mode, data.modes.map((m) => [m, m.replaceAll("_", " ")]));
    if (data.modes.includes(keep)) mode.value = keep;
    status.textContent = "";
  } catch (e) {
    fillSelect(mode, []);
    status.textContent = `cannot load ${run}: ${e.message}`;
  }
}

function formFor(run, checkpoint) {
  const form = new FormData();
  form.append("run", run);
  form.append("checkpoint", checkpoint);
  form.append("mode", document.getElementById("mode").value);
  form.append("prompt", document.getElementById("prompt").value);
  for (const name of NUMBER_FIELDS) form.append(name, document.getElementById(name).value);
  if (GUIDED_MODES.includes(document.getElementById("mode").value)) {
    form.append("cfg_scale", document.getElementById("cfg_scale").value);
  }
  const image = document.getElementById("image").files[0];
  if (image) form.append("image", image);
  return form;
}

function renderSegment(segment) {
  if (segment.modality === "image" && segment.image) {
    return el("img", {class: "generated-image", src: segment.image,
                      alt: "generated image", width: String(segment.width * 4),
                      "data-width": String(segment.width), "data-height": String(segment.height)});
  }
  if (segment.modality === "speech" && segment.audio) {
    return el("audio", {class: "generated-audio", controls: "", src: segment.audio});
  }
  return el("p", {class: "generated-text"}, segment.text || "");
}

function renderColumn(column, result) {
  const speed = result.tokens_per_s ? `${fmt(result.tokens_per_s, 1)} tokens/s` : "";
  column.append(el("p", {class: "timing"},
    `${result.new_tokens} new tokens in ${fmt(result.seconds, 2)} s ${speed}`));
  const samples = el("div", {class: "samples"});
  result.samples.forEach((sample, i) => {
    const box = el("div", {class: "sample"}, el("h3", {}, `sample ${i + 1}`));
    for (const segment of sample.segments) box.append(renderSegment(segment));
    box.append(el("p", {class: "timing"}, `${sample.new_tokens} tokens`));
    samples.append(box);
  });
  column.append(samples);
}

async function runColumn(output, run, checkpoint) {
  const column = el("div", {class: "column"}, el("h2", {}, `${run} @ ${checkpoint || "latest"}`));
  output.append(column);
  try {
    const result = await getJSON("/generate", {method: "POST", body: formFor(run, checkpoint)});
    column.querySelector("h2").textContent = `${run} @ step ${result.checkpoint}`;
    renderColumn(column, result);
  } catch (e) {
    column.append(el("p", {class: "error"}, e.field ? `${e.message}` : `error: ${e.message}`));
  }
}

async function submit(event) {
  event.preventDefault();
  const output = document.getElementById("output");
  const status = document.getElementById("status");
  const button = document.getElementById("generate");
  output.replaceChildren();
  output.dataset.state = "running";
  button.disabled = true;
  status.textContent = "generating...";
  const started = performance.now();
  const jobs = [runColumn(output, document.getElementById("run").value,
                          document.getElementById("checkpoint").value)];
  if (document.getElementById("compare").checked) {
    jobs.push(runColumn(output, document.getElementById("run-b").value,
                        document.getElementById("checkpoint-b").value));
  }
  await Promise.all(jobs);
  status.textContent = `done in ${fmt((performance.now() - started) / 1000, 2)} s`;
  output.dataset.state = "done";
  button.disabled = false;
}

async function init() {
  RUNS = await fillRunLinks();
  const run = document.getElementById("run"), runB = document.getElementById("run-b");
  const checkpoint = document.getElementById("checkpoint");
  const checkpointB = document.getElementById("checkpoint-b");
  fillSelect(run, RUNS.map((r) => [r.name, r.name]));
  fillSelect(runB, RUNS.map((r) => [r.name, r.name]));
  if (RUNS.length > 1) runB.value = RUNS[1].name;
  fillCheckpoints(run, checkpoint);
  fillCheckpoints(runB, checkpointB);
  run.addEventListener("change", () => { fillCheckpoints(run, checkpoint); fillModes(); });
  checkpoint.addEventListener("change", fillModes);
  runB.addEventListener("change", () => fillCheckpoints(runB, checkpointB));
  document.getElementById("compare").addEventListener("change", (e) => {
    runB.disabled = checkpointB.disabled = !e.target.checked;
  });
  document.getElementById("generate-form").addEventListener("submit", submit);
  await fillModes();
  document.body.dataset.ready = "true";
}

init();
