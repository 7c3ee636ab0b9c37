// The live view's page: draws /api/live (jobs/dashboard/server.py) and refreshes it. Every value
// from the data is set as text (textContent, attributes), never as markup.
"use strict";

const REFRESH_MS = 10000;
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const SVG = "http://www.w3.org/2000/svg";

function element(tag, text, attributes) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
  return node;
}

function drawSizes(segments) {
  const body = document.querySelector("#sizes tbody");
  body.replaceChildren();
  for (const s of segments) {
    const row = element("tr", undefined, { "data-segment": s.segment });
    row.append(
      element("td", s.segment, { class: "segment" }),
      element("td", s.members, { class: "members" }),
      element("td", s.entries, { class: "entries" }),
      element("td", s.exits, { class: "exits" }),
      element("td", s.flaps, { class: "flaps" }),
      element("td", s.flap_rate.toFixed(3), { class: "flap-rate" }),
    );
    body.append(row);
  }
}

function drawChart(history, segments) {
  const svg = document.getElementById("chart");
  const legend = document.getElementById("legend");
  svg.replaceChildren();
  legend.replaceChildren();
  const width = Number(svg.getAttribute("width")), height = Number(svg.getAttribute("height"));
  const pad = 30;
  if (history.length === 0) return;
  const t0 = history[0].t, t1 = Math.max(history[history.length - 1].t, t0 + 1);
  let top = 1;
  for (const sample of history) for (const n of Object.values(sample.sizes)) top = Math.max(top, n);
  const x = (t) => pad + ((t - t0) / (t1 - t0)) * (width - 2 * pad);
  const y = (n) => height - pad - (n / top) * (height - 2 * pad);
  const label = (text, xAt, anchor) => {
    const node = document.createElementNS(SVG, "text");
    node.setAttribute("x", xAt);
    node.setAttribute("y", anchor === "top" ? pad - 8 : height - 8);
    if (anchor === "end") node.setAttribute("text-anchor", "end");
    node.textContent = text;
    svg.append(node);
  };
  label(`max ${top}`, 2, "top");
  label(new Date(t0).toISOString().slice(0, 16).replace("T", " "), pad, "start");
  label(`${new Date(t1).toISOString().slice(0, 16).replace("T", " ")} UTC`, width - pad, "end");
  // Only the segments that had members at some sample: a flat line at zero says nothing.
  const drawn = segments.filter((s) => history.some((sample) => (sample.sizes[s.segment] || 0) > 0));
  drawn.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const points = history.map((sample) => `${x(sample.t).toFixed(1)},${y(sample.sizes[s.segment] || 0).toFixed(1)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colour);
    line.setAttribute("data-segment", s.segment);
    svg.append(line);
    const key = element("span", s.segment, { style: `color: ${colour}` });
    legend.append(key);
  });
}

function drawMovers(movers, windowMs) {
  document.getElementById("window").textContent = `(last ${Math.round(windowMs / 60000)} min)`;
  const list = document.getElementById("movers");
  list.replaceChildren();
  if (movers.length === 0) list.append(element("li", "no segment changed size in the window", { class: "none" }));
  for (const m of movers) {
    const sign = m.change > 0 ? "+" : "";
    list.append(
      element("li", `${m.segment}: ${sign}${m.change} (${m.before} → ${m.now})`, {
        class: "mover",
        "data-segment": m.segment,
        "data-change": m.change,
      }),
    );
  }
}

function drawWarnings(warnings) {
  const list = document.getElementById("warnings");
  list.replaceChildren();
  if (warnings.length === 0) list.append(element("li", "none", { class: "none" }));
  for (const w of warnings) {
    list.append(element("li", w.message, { class: "warning", "data-kind": w.kind, "data-segments": w.segments.join(",") }));
  }
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/api/live", { cache: "no-store" });
    const live = await response.json();
    if (!response.ok) throw new Error(live.error || response.statusText);
    drawSizes(live.segments);
    drawChart(live.history, live.segments);
    drawMovers(live.top_movers, live.window_ms);
    drawWarnings(live.warnings);
    status.textContent = `updated ${new Date(live.now).toISOString()}; ${live.history.length} size samples`;
    status.setAttribute("data-loaded", live.now);
  } catch (error) {
    status.textContent = `could not load the live view: ${error.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
