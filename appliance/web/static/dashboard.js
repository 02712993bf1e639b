// The dashboard: reads the admin API every 30 seconds and draws it; the
// buttons call the operator actions. The browser's HTTP Basic login of the
// page is sent with every request, as for the page itself. Text is set
// with textContent only: nothing the API returns is parsed as HTML.
"use strict";

const REFRESH_MS = 30000;
const SVG = "http://www.w3.org/2000/svg";

function $(id) { return document.getElementById(id); }

function grouped(n) {
  // 1234567 -> "1,234,567", whatever the browser's locale.
  return String(Math.round(n)).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

function size(bytes) {
  // As the command line prints sizes: 1,234 B, 12.3 MiB.
  if (bytes === null || bytes === undefined) return "–";
  let value = bytes;
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) {
    if (value < 1024 || unit === "TiB") {
      return unit === "B" ? grouped(bytes) + " B" : value.toFixed(1) + " " + unit;
    }
    value /= 1024;
  }
  return grouped(bytes) + " B";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  const whole = Math.round(seconds);
  if (whole < 60) return whole + " s";
  const days = Math.floor(whole / 86400);
  const hours = Math.floor((whole % 86400) / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  if (days) return days + " d " + hours + " h";
  if (hours) return hours + " h " + minutes + " min";
  return minutes + " min " + (whole % 60) + " s";
}

function clock(epochSeconds) {
  const d = new Date(epochSeconds * 1000);
  return String(d.getHours()).padStart(2, "0") + ":" +
    String(d.getMinutes()).padStart(2, "0");
}

function text(id, value) { $(id).textContent = value; }

function cell(row, value, className) {
  const td = document.createElement("td");
  td.textContent = value;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function rows(tableId) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  return body;
}

function svgNode(parent, name, attributes, content) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) {
    node.setAttribute(key, value);
  }
  if (content !== undefined) node.textContent = content;
  parent.appendChild(node);
  return node;
}

async function api(path, options) {
  // Opened as http://name:password@host/, the page's own URL holds the
  // credentials and fetch refuses any URL resolved against it; the origin
  // never holds them, and the browser still sends the login it has.
  const url = new URL(path, window.location.origin);
  const answer = await fetch(url, Object.assign({ cache: "no-store" }, options));
  let body = null;
  try { body = await answer.json(); } catch (e) { body = null; }
  if (!answer.ok) {
    const why = body && body.error ? body.error : answer.statusText;
    throw new Error(path + ": " + answer.status + " " + why);
  }
  return body;
}

function say(message, bad) {
  const node = $("message");
  node.textContent = message;
  node.className = bad ? "bad" : "";
}

// -- drawing ---------------------------------------------------------------

function drawTiers(rowsOfTiers) {
  const chart = $("tier-chart");
  chart.replaceChildren();
  const left = 80, width = 600, barHeight = 22, gap = 14;
  const measured = rowsOfTiers.filter((r) => r.capacity_bytes);
  const height = Math.max(1, measured.length) * (barHeight + gap) + 18;
  chart.setAttribute("viewBox", "0 0 " + (left + width + 60) + " " + height);
  measured.forEach((row, index) => {
    const y = index * (barHeight + gap) + 4;
    const share = Math.min(1, row.used_bytes / row.capacity_bytes);
    const over = row.high_watermark !== null &&
      100 * row.used_bytes / row.capacity_bytes > row.high_watermark;
    svgNode(chart, "text", { x: 0, y: y + 15 }, row.tier);
    svgNode(chart, "rect", { class: "track", x: left, y: y, width: width,
      height: barHeight, rx: 3 });
    svgNode(chart, "rect", { class: over ? "used over" : "used", x: left, y: y,
      width: width * share, height: barHeight, rx: 3,
      "data-tier": row.tier });
    for (const [mark, cls] of [[row.low_watermark, "mark-low"],
                               [row.high_watermark, "mark-high"]]) {
      if (mark === null) continue;
      const x = left + width * mark / 100;
      svgNode(chart, "line", { class: cls, x1: x, x2: x, y1: y - 3,
        y2: y + barHeight + 3 });
    }
    svgNode(chart, "text", { x: left + width + 6, y: y + 15 },
      (100 * row.used_bytes / row.capacity_bytes).toFixed(1) + "%");
  });
  if (!measured.length) {
    svgNode(chart, "text", { x: 0, y: 14 }, "no tier has a capacity set");
  } else {
    const y = height - 4;
    svgNode(chart, "line", { class: "mark-low", x1: left, x2: left + 20,
      y1: y - 4, y2: y - 4 });
    svgNode(chart, "text", { x: left + 24, y: y }, "low watermark");
    svgNode(chart, "line", { class: "mark-high", x1: left + 130, x2: left + 150,
      y1: y - 4, y2: y - 4 });
    svgNode(chart, "text", { x: left + 154, y: y }, "high watermark");
  }
}

function drawBars(chartId, hours, key, label) {
  const chart = $(chartId);
  chart.replaceChildren();
  const width = 480, height = 140, bottom = 18, top = 14;
  chart.setAttribute("viewBox", "0 0 " + width + " " + height);
  const most = Math.max(1, ...hours.map((h) => h[key]));
  const step = width / hours.length;
  hours.forEach((hour, index) => {
    const value = hour[key];
    const barHeight = (height - bottom - top) * value / most;
    svgNode(chart, "rect", { class: "bar", x: index * step + 1,
      y: height - bottom - barHeight, width: step - 2, height: barHeight,
      "data-value": value }).appendChild(
      document.createElementNS(SVG, "title")).textContent =
      clock(hour.hour) + ": " + label(value);
    if (index % 6 === 0) {
      svgNode(chart, "text", { x: index * step, y: height - 4 }, clock(hour.hour));
    }
  });
  svgNode(chart, "line", { class: "axis", x1: 0, x2: width,
    y1: height - bottom, y2: height - bottom });
  const peak = Math.max(...hours.map((h) => h[key]));
  svgNode(chart, "text", { x: 0, y: 10 },
    peak ? "highest " + label(peak) : "nothing in these 24 hours");
}

// -- the sections ------------------------------------------------------------

function showStatus(status) {
  for (const level of ["patients", "studies", "series", "instances"]) {
    text("count-" + level, grouped(status[level]));
  }
  const body = rows("tiers");
  for (const row of status.watermarks) {
    const tr = document.createElement("tr");
    cell(tr, row.tier);
    cell(tr, grouped(row.studies), "number");
    cell(tr, size(row.used_bytes === null ? row.instance_bytes : row.used_bytes),
      "number");
    cell(tr, size(row.capacity_bytes), "number");
    cell(tr, row.high_watermark === null ? "–" :
      row.low_watermark + "% / " + row.high_watermark + "%", "number");
    body.appendChild(tr);
  }
  drawTiers(status.watermarks);
  const queues = status.queues;
  text("queue-replication", grouped(queues.replication.instances));
  text("queue-recall", grouped(queues.recall.studies_waiting));
  text("queue-prefetch",
    grouped(queues.prefetch.waiting) + " / " + grouped(queues.prefetch.late));
  text("queue-restore", queues.restore ? queues.restore.state : "none");
}

function showReplication(mirror) {
  const point = mirror.recovery_point;
  // "up to date" only when nothing waits and the mirror takes what is sent.
  text("recovery-point", point.instances ? duration(point.seconds) + " behind" :
    mirror.state === "up to date" ? "up to date" : "no instance waits");
  text("mirror-state", mirror.summary);
  text("mirror-queued",
    grouped(point.instances) + " instances, " + size(point.bytes));
  text("mirror-rate", mirror.rate);
  text("mirror-snapshot", mirror.last_snapshot || "none yet");
  const restore = mirror.full_restore;
  text("full-restore", restore.seconds === null ? "unknown" :
    "about " + duration(restore.seconds));
  $("full-restore").title = restore.basis;
}

function actionButton(label, path, volume) {
  const button = document.createElement("button");
  button.textContent = label;
  button.dataset.volume = volume;
  button.addEventListener("click", async () => {
    button.disabled = true;
    say(label + " " + volume + "…", false);
    try {
      const done = await api(path, { method: "POST",
        headers: { "Content-Type": "application/json" }, body: "{}" });
      const recalled = done.recalls ? ", " + done.recalls.length +
        " waiting study(ies) recalled" : "";
      say("volume " + volume + (done.reachable ? " reachable" : " on the shelf") +
        recalled, false);
    } catch (error) {
      say(error.message, true);
    }
    await refresh();
  });
  return button;
}

function showVolumes(found) {
  const requests = rows("requests");
  $("no-requests").hidden = found.requests.length > 0;
  $("requests").hidden = found.requests.length === 0;
  for (const request of found.requests) {
    const tr = document.createElement("tr");
    tr.id = "request-" + request.volume;
    cell(tr, request.volume);
    cell(tr, request.description);
    cell(tr, new Date(request.created * 1000).toLocaleString());
    const action = cell(tr, "");
    action.appendChild(actionButton("Loaded",
      "/api/volumes/" + encodeURIComponent(request.volume) + "/loaded",
      request.volume));
    requests.appendChild(tr);
  }
  const volumes = rows("volumes");
  for (const volume of found.volumes) {
    const tr = document.createElement("tr");
    tr.id = "volume-" + volume.label;
    cell(tr, volume.label);
    cell(tr, (volume.reachable ? "loaded" : "on the shelf") +
      (volume.full ? ", full" : "")).className = "state";
    cell(tr, size(volume.used_bytes), "number");
    cell(tr, size(volume.capacity_bytes), "number");
    cell(tr, volume.packs === null ? "?" : grouped(volume.packs), "number");
    const action = cell(tr, "");
    const verb = volume.reachable ? "unloaded" : "loaded";
    action.appendChild(actionButton(volume.reachable ? "Unload" : "Loaded",
      "/api/volumes/" + encodeURIComponent(volume.label) + "/" + verb,
      volume.label));
    volumes.appendChild(tr);
  }
}

function isToday(epochSeconds) {
  const when = new Date(epochSeconds * 1000), now = new Date();
  return when.toDateString() === now.toDateString();
}

function showPrefetch(report) {
  const body = rows("appointments");
  const today = report.appointments.filter((a) => isToday(a.start));
  $("no-appointments").hidden = today.length > 0;
  $("appointments").hidden = today.length === 0;
  for (const appointment of today) {
    const tr = document.createElement("tr");
    const online = appointment.priors.filter((p) => p.state === "online").length;
    const total = appointment.priors.length;
    cell(tr, clock(appointment.start));
    cell(tr, appointment.modality || appointment.procedure_code);
    cell(tr, online + " of " + total, "number");
    const states = appointment.priors.map((p) => p.state)
      .filter((s) => s !== "online");
    cell(tr, online === total ? "ready" : states.join(", "),
      online === total ? "ok" : "fail");
    body.appendChild(tr);
  }
}

function showDrill(found) {
  const node = $("last-drill");
  const drill = found.drills[found.drills.length - 1];
  if (!drill) {
    node.textContent = "no restore drill yet (appliance dr drill)";
    node.className = "";
    return;
  }
  node.textContent = drill.date + ": " + (drill.ok ? "passed" :
    "FAILED (" + drill.failures + " problems)") + ", " + grouped(drill.studies) +
    " studies, " + grouped(drill.instances) + " instances in " +
    duration(drill.seconds);
  node.className = drill.ok ? "ok" : "fail";
}

function showErrors(found) {
  const body = rows("errors");
  $("no-errors").hidden = found.errors.length > 0;
  $("errors").hidden = found.errors.length === 0;
  for (const entry of found.errors.slice().reverse()) {
    const tr = document.createElement("tr");
    cell(tr, entry.time.replace("T", " ").slice(0, 19));
    cell(tr, entry.level, "level-" + entry.level);
    cell(tr, entry.logger);
    cell(tr, entry.message);
    body.appendChild(tr);
  }
}

function showRates(found) {
  drawBars("ingest-chart", found.hours, "ingested_instances", grouped);
  drawBars("replication-chart", found.hours, "replicated_bytes", size);
}

async function refresh() {
  const sections = [
    ["/api/status", showStatus],
    ["/api/replication", showReplication],
    ["/api/volumes", showVolumes],
    ["/api/prefetch", showPrefetch],
    ["/api/drills?last=1", showDrill],
    ["/api/errors?last=10", showErrors],
    ["/api/rates", showRates],
  ];
  const results = await Promise.allSettled(
    sections.map(([path, show]) => api(path).then(show)));
  const failed = results.filter((r) => r.status === "rejected");
  if (failed.length) say(failed[0].reason.message, true);
  text("refreshed", "updated " + new Date().toLocaleTimeString());
  document.body.dataset.loaded = "yes";
}

document.addEventListener("DOMContentLoaded", () => {
  refresh();
  setInterval(refresh, REFRESH_MS);
});
