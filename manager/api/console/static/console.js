// The console's one script: local times, and the live parts of the overview, the runs
// list and an unfinished run. Every value from the server is set as text (textContent),
// never as markup, and links are built from encoded ids under this origin.
"use strict";

const NS = "http://www.w3.org/2000/svg";

function showTimes(root) {
  for (const t of root.querySelectorAll("time[data-epoch]")) {
    const epoch = Number(t.dataset.epoch);
    if (epoch > 0) t.textContent = new Date(epoch * 1000).toLocaleString();
  }
}

function cell(row, text, className) {
  const td = row.insertCell();
  if (className) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    td.appendChild(span);
  } else {
    td.textContent = text;
  }
  return td;
}

async function poll(url, every, apply) {
  const live = document.getElementById("live");
  try {
    const answer = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (answer.status === 401) { window.location.assign("/ui/signin"); return; }
    if (answer.ok) { apply(await answer.json()); if (live) live.className = "live"; }
    else if (live) live.className = "live stale";
  } catch (e) {
    if (live) live.className = "live stale";
  }
  window.setTimeout(() => poll(url, every, apply), every);
}

function runRows(data) {
  const box = document.getElementById("runs");
  const body = box.querySelector("tbody");
  const fresh = document.createElement("tbody");
  for (const r of data.runs) {
    const row = fresh.insertRow();
    row.dataset.id = r.id;
    const link = document.createElement("a");
    link.href = box.dataset.runUrl.replace("RUN", encodeURIComponent(r.id));
    link.textContent = r.id.slice(0, 12);
    row.insertCell().appendChild(link);
    cell(row, r.plugin);
    cell(row, r.status, "status " + r.status);
    cell(row, r.topic + " / " + r.event_type);
    const when = document.createElement("time");
    when.dataset.epoch = r.created_at;
    row.insertCell().appendChild(when);
    cell(row, r.duration_s === null ? "" : r.duration_s.toFixed(3) + " s");
    cell(row, r.warm === true ? "warm" : r.warm === false ? "cold" : "");
  }
  if (!data.runs.length) {
    const row = fresh.insertRow();
    row.className = "empty";
    cell(row, "No runs.").colSpan = 7;
  }
  body.replaceWith(fresh);
  showTimes(fresh);
}

function drawChart(minutes) {
  const svg = document.getElementById("chart");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const peak = Math.max(0.001, ...minutes.map((m) => m.ended / 60));
  document.getElementById("peak").textContent = peak.toFixed(2);
  for (const [field, name] of [["ended", "ended"], ["failed", "failed"]]) {
    const line = document.createElementNS(NS, "polyline");
    const points = minutes.map((m, i) =>
      `${(i * 600 / Math.max(1, minutes.length - 1)).toFixed(1)},${(155 - (m[field] / 60) / peak * 145).toFixed(1)}`);
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", name);
    svg.appendChild(line);
  }
}

function overview(data) {
  document.getElementById("ended").textContent = data.ended_last_hour;
  document.getElementById("failed").textContent = data.failed_last_hour;
  document.getElementById("workers").textContent = data.workers;
  document.getElementById("dead").textContent = data.dead_last_hour;
  document.getElementById("warm").textContent =
    data.warm_share === null ? "—" : Math.round(data.warm_share * 100) + "%";
  drawChart(data.minutes);
  const fresh = document.createElement("tbody");
  for (const q of data.queues) {
    const row = fresh.insertRow();
    const link = document.createElement("a");
    link.href = "/ui/plugins/" + encodeURIComponent(q.plugin);
    link.textContent = q.plugin;
    row.insertCell().appendChild(link);
    cell(row, String(q.depth));
    cell(row, q.oldest_wait_s === null ? "" : q.oldest_wait_s + " s");
  }
  if (!data.queues.length) {
    const row = fresh.insertRow();
    row.className = "empty";
    cell(row, "Nothing is waiting.").colSpan = 3;
  }
  document.querySelector("#queues tbody").replaceWith(fresh);
}

document.addEventListener("DOMContentLoaded", () => {
  showTimes(document);
  const page = document.body.dataset.page;
  if (page === "runs") {
    const box = document.getElementById("runs");
    poll(box.dataset.source, 2000, runRows);
  } else if (page === "overview") {
    poll("/ui/overview.json", 5000, overview);
  } else if (page === "run" && document.body.dataset.active === "1") {
    window.setTimeout(() => window.location.reload(), 2000);
  }
});
