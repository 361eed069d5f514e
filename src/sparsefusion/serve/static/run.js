// The run page: summary, loss plot, sparsefusion eval rows, samples, compare reports, config.
"use strict";

function summaryRows(run) {
  const rows = [["path", run.path], ["arch", run.arch], ["last step", run.last_step],
                ["checkpoints", run.checkpoints.join(", ") || "none"]];
  for (const [split, losses] of [["train", run.final_train], ["validation", run.final_val]]) {
    for (const [key, value] of Object.entries(losses)) rows.push([`final ${split} ${key}`, fmt(value)]);
  }
  return rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v === null ? "" : v)));
}

// One row per evaluation; nested values (e.g. "skipped": metric -> why) are shown as JSON.
function evalTable(rows) {
  const keys = [];
  for (const row of rows) for (const k of Object.keys(row)) if (!keys.includes(k)) keys.push(k);
  keys.sort((a, b) => (a === "step" ? -1 : b === "step" ? 1 : a.localeCompare(b)));
  const cell = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : fmt(v));
  const head = el("tr", {}, ...keys.map((k) => el("th", {}, k)));
  const body = rows.map((row) => el("tr", {}, ...keys.map((k) => el("td", {}, cell(row[k])))));
  return [head, ...body];
}

function sampleNode(sample) {
  const name = sample.path.toLowerCase();
  let media;
  if (/\.(png|jpe?g|gif)$/.test(name)) media = el("img", {src: sample.url, alt: sample.path});
  else if (name.endsWith(".wav")) media = el("audio", {controls: "", src: sample.url});
  else media = el("a", {href: sample.url}, "open");
  return el("figure", {}, media, el("figcaption", {}, sample.path));
}

function reportNode(report) {
  const box = el("div", {class: "report"}, el("p", {}, report.folder));
  for (const url of report.plots) box.append(el("img", {class: "report-plot", src: url, alt: url}));
  if (report.summary) box.append(el("pre", {}, report.summary));
  return box;
}

async function init() {
  fillRunLinks();
  const name = decodeURIComponent(location.pathname.split("/").pop());
  const run = await getJSON(`/runs/${encodeURIComponent(name)}`);
  document.title = `sparsefusion run ${run.name}`;
  document.getElementById("run-title").textContent = `run ${run.name}`;
  document.getElementById("summary").replaceChildren(...summaryRows(run));
  document.getElementById("loss-plot").src = run.loss_plot;
  if (run.eval.length) {
    document.getElementById("eval").replaceChildren(...evalTable(run.eval));
    document.getElementById("eval-section").hidden = false;
  }
  if (run.samples.length) {
    document.getElementById("samples").replaceChildren(...run.samples.map(sampleNode));
    document.getElementById("samples-section").hidden = false;
  }
  if (run.reports.length) {
    document.getElementById("reports").replaceChildren(...run.reports.map(reportNode));
    document.getElementById("reports-section").hidden = false;
  }
  document.getElementById("config").textContent = JSON.stringify(run.config, null, 2);
  document.body.dataset.ready = "true";
}

init().catch((e) => {
  document.getElementById("run-title").textContent = `error: ${e.message}`;
});
