// Helpers shared by the playground and the run page (no framework, no build step).
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// fetch JSON; a non-2xx answer throws an Error carrying the server's message and field.
async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
    error.field = body && body.field;
    error.status = response.status;
    throw error;
  }
  return body;
}

function fmt(value, digits) {
  if (typeof value !== "number") return value === null || value === undefined ? "" : String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits === undefined ? 4 : digits);
}

async function fillRunLinks() {
  const nav = document.getElementById("run-links");
  const data = await getJSON("/runs");
  nav.replaceChildren(el("a", {href: "/"}, "playground"));
  for (const run of data.runs) nav.append(" | ", el("a", {href: `/run/${run.name}`}, run.name));
  return data.runs;
}
