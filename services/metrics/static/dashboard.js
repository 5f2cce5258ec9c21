// Afterglow dashboard: plain JS, no library, no network beyond this service's JSON API.
// The page is public; its data calls carry a bearer token with the metrics:read scope,
// given in the form (or once as #token=... in the address), kept in sessionStorage only.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const STORE = "afterglow.metrics.token";
const MEASURES = ["planned", "sent", "opened", "clicked", "converted"];
const COLOURS = {
  planned: "#9aa5b8", sent: "#3b6fd8", opened: "#1ba39c", clicked: "#f2a23a", converted: "#d6455d",
};
const WAVES = ["launch", "day3", "day7", "day14", "day30"];
const params = new URLSearchParams(location.search);
const refreshSeconds = Math.max(2, Number(params.get("refresh")) || 15);
let promotion = params.get("promotion_id") || "";

function token() {
  return sessionStorage.getItem(STORE) || "";
}

function takeTokenFromAddress() {
  const hash = new URLSearchParams(location.hash.replace(/^#/, ""));
  const given = hash.get("token");
  if (given) {
    sessionStorage.setItem(STORE, given);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

class AuthError extends Error {}

async function api(path, query) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const answer = await fetch(url, { headers: { Authorization: "Bearer " + token() } });
  if (answer.status === 401 || answer.status === 403) throw new AuthError(answer.status + "");
  if (!answer.ok) throw new Error(path + ": HTTP " + answer.status);
  return answer.json();
}

// -- small DOM helpers (textContent only: no markup from data) -----------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function pct(v) {
  return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%";
}

function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 2 : digits });
}

function table(headers, rows) {
  const head = el("tr", {}, ...headers.map((h) => el("th", {}, h)));
  const body = rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

function replace(id, ...nodes) {
  const target = document.getElementById(id);
  target.replaceChildren(...nodes);
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// -- charts --------------------------------------------------------------------------

function funnelChart(rows) {
  const W = 1100, H = 320, left = 56, bottom = 40, top = 24;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Funnel per wave", id: "funnel-svg" });
  const max = niceMax(Math.max(0, ...rows.flatMap((r) => MEASURES.map((m) => r[m] || 0))));
  const plotH = H - top - bottom;
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    chart.append(svg("line", { x1: left, x2: W - 8, y1: y, y2: y, stroke: "#e3e6ec" }));
    chart.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7280" }, num((max * i) / 4, 0)));
  }
  const groupW = (W - left - 8) / Math.max(1, rows.length);
  const barW = Math.min(36, (groupW - 24) / MEASURES.length);
  rows.forEach((row, gi) => {
    const g = svg("g", { class: "wave", "data-wave": row.wave });
    const x0 = left + gi * groupW + (groupW - barW * MEASURES.length) / 2;
    MEASURES.forEach((m, mi) => {
      const v = row[m] || 0;
      const h = (plotH * v) / max;
      const x = x0 + mi * barW;
      g.append(svg("rect", {
        class: "bar", x: x + 2, y: top + plotH - h, width: barW - 4, height: Math.max(h, 0.5),
        fill: COLOURS[m], "data-wave": row.wave, "data-measure": m, "data-value": v,
      }));
      g.append(svg("text", { class: "value", x: x + barW / 2, y: top + plotH - h - 4, "text-anchor": "middle", "font-size": 11 }, num(v, 0)));
    });
    g.append(svg("text", { x: left + gi * groupW + groupW / 2, y: H - 16, "text-anchor": "middle", "font-size": 13, "font-weight": 600 }, row.wave));
    chart.append(g);
  });
  const legend = svg("g", { class: "legend" });
  MEASURES.forEach((m, i) => {
    legend.append(svg("rect", { x: left + i * 110, y: 4, width: 12, height: 12, fill: COLOURS[m] }));
    legend.append(svg("text", { x: left + i * 110 + 16, y: 14, "font-size": 12 }, m));
  });
  chart.append(legend);
  return chart;
}

function rateChart(rows, key, id) {
  const W = 540, rowH = 34, left = 110, right = 70;
  const H = Math.max(1, rows.length) * rowH + 20;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Conversion by " + key, id });
  const max = Math.max(0.0001, ...rows.map((r) => r.conversion_rate || 0));
  rows.forEach((row, i) => {
    const name = row[key] || "(none)";
    const v = row.conversion_rate;
    const y = 10 + i * rowH;
    const w = v ? ((W - left - right) * v) / max : 0;
    chart.append(svg("text", { x: left - 8, y: y + 18, "text-anchor": "end", "font-size": 12 }, name));
    chart.append(svg("rect", {
      class: "bar", x: left, y: y + 4, width: Math.max(w, 0.5), height: rowH - 10,
      fill: "#d6455d", "data-group": name, "data-measure": "conversion_rate", "data-value": v === null ? "" : v,
    }));
    chart.append(svg("text", { class: "value", x: left + w + 6, y: y + 18, "font-size": 12 }, pct(v)));
  });
  return chart;
}

function experimentChart(exp) {
  const items = [
    ...exp.variants.map((v) => ({ ...v, name: "variant " + (v.name || "(none)") })),
    ...exp.waves.map((w) => ({ ...w, name: "wave " + w.wave })),
  ].filter((x) => x.uplift !== null && x.uplift !== undefined);
  const W = 1100, rowH = 30, left = 150, right = 90;
  const H = Math.max(1, items.length) * rowH + 40;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Uplift with 95% interval", id: "experiment-svg" });
  const span = Math.max(0.01, ...items.flatMap((x) => [Math.abs(x.ci_low), Math.abs(x.ci_high)]));
  const scale = (v) => left + ((W - left - right) * (v + span)) / (2 * span);
  chart.append(svg("line", { x1: scale(0), x2: scale(0), y1: 0, y2: H - 20, stroke: "#6b7280", "stroke-dasharray": "4 3" }));
  chart.append(svg("text", { x: scale(0), y: H - 4, "text-anchor": "middle", "font-size": 11, fill: "#6b7280" }, "no uplift"));
  items.forEach((x, i) => {
    const y = 16 + i * rowH;
    const colour = x.significant ? "#2f9e52" : "#3b6fd8";
    chart.append(svg("text", { x: left - 8, y: y + 4, "text-anchor": "end", "font-size": 12 }, x.name));
    chart.append(svg("line", { class: "ci", x1: scale(x.ci_low), x2: scale(x.ci_high), y1: y, y2: y, stroke: colour, "stroke-width": 4, "data-name": x.name, "data-low": x.ci_low, "data-high": x.ci_high }));
    chart.append(svg("circle", { class: "uplift", cx: scale(x.uplift), cy: y, r: 6, fill: colour, "data-name": x.name, "data-value": x.uplift }));
    chart.append(svg("text", { x: scale(x.ci_high) + 8, y: y + 4, "font-size": 11 }, (x.uplift >= 0 ? "+" : "") + pct(x.uplift)));
  });
  return chart;
}

// -- sections ------------------------------------------------------------------------

function funnelTable(rows, key) {
  return table(
    [key, "planned", "sent", "opened", "clicked", "converted", "open rate", "click rate", "conversion", "AOV", "revenue", "ROI", "mean LTV", "health"],
    rows.map((r) => [r[key] || "(none)", num(r.planned, 0), num(r.sent, 0), num(r.opened, 0), num(r.clicked, 0), num(r.converted, 0),
      pct(r.open_rate), pct(r.click_rate), pct(r.conversion_rate), num(r.aov), num(r.revenue), num(r.roi), num(r.ltv, 0), num(r.health_index, 1)]),
  );
}

function breakdownTable(rows, key) {
  return table(
    [key, "sent", "opened", "clicked", "converted", "conversion", "AOV", "revenue"],
    rows.map((r) => [r[key] || "(none)", num(r.sent, 0), num(r.opened, 0), num(r.clicked, 0), num(r.converted, 0),
      pct(r.conversion_rate), num(r.aov), num(r.revenue)]),
  );
}

function byWave(rows) {
  return [...rows].sort((a, b) => (WAVES.indexOf(a.wave) + 99) % 99 - (WAVES.indexOf(b.wave) + 99) % 99);
}

function renderLights(lights) {
  const select = document.getElementById("promotion");
  const ids = lights.map((l) => l.promotion_id);
  if (promotion && !ids.includes(promotion)) ids.unshift(promotion);
  if (!promotion && ids.length) promotion = ids[0];
  select.replaceChildren(...ids.map((id) => {
    const option = el("option", { value: id }, id);
    if (id === promotion) option.selected = true;
    return option;
  }));
  replace("lights", ...lights.map((l) => {
    const item = el("li", { class: "light " + l.light, "data-promotion": l.promotion_id, "data-light": l.light },
      el("span", { class: "dot " + l.light, title: l.light }), el("strong", {}, l.promotion_id),
      el("span", { class: "muted" }, `${l.light}, ${l.streak} day(s) under baseline; conversion ${pct(l.conversion)} vs ${pct(l.baseline)}`));
    item.addEventListener("click", () => choose(l.promotion_id));
    return item;
  }));
  if (!lights.length) replace("lights", el("li", { class: "muted" }, "No promotion evaluated yet (a day has to be complete)."));
}

function renderAlerts(alerts) {
  if (!alerts.length) {
    replace("alerts", el("p", { class: "muted" }, "No alert for this promotion."));
    return;
  }
  replace("alerts", table(
    ["day", "status", "severity", "metric", "wave", "channel", "value", "baseline", "message"],
    alerts.map((a) => [a.day, a.status, el("span", { class: "sev-" + a.severity }, a.severity), a.metric, a.wave || "–", a.channel || "–",
      a.metric === "aov" ? num(a.value) : pct(a.value), a.metric === "aov" ? num(a.baseline) : pct(a.baseline), a.message]),
  ));
}

function renderExperiment(exp) {
  if (!exp) {
    replace("experiment-chart");
    replace("experiments", el("p", { class: "muted" }, "No experiment data yet."));
    return;
  }
  replace("experiment-chart", experimentChart(exp));
  const rows = [
    ["holdout", num(exp.holdout.exposed, 0), num(exp.holdout.converted, 0), pct(exp.holdout.conversion_rate), "–", "–", "–"],
    ...exp.variants.map((v) => ["variant " + (v.name || "(none)"), num(v.exposed, 0), num(v.converted, 0), pct(v.conversion_rate), pct(v.uplift),
      v.ci_low === null ? "–" : `${pct(v.ci_low)} … ${pct(v.ci_high)}`, v.still_needed === null ? "–" : num(v.still_needed, 0)]),
    ...exp.waves.map((w) => ["wave " + w.wave, num(w.treated.exposed, 0), num(w.treated.converted, 0), pct(w.treated.conversion_rate), pct(w.uplift),
      w.ci_low === null ? "–" : `${pct(w.ci_low)} … ${pct(w.ci_high)}`, w.still_needed === null ? "–" : num(w.still_needed, 0)]),
  ];
  replace("experiments", table(["group", "participants", "converted", "conversion", "uplift", "95% interval", "still needed"], rows));
}

async function refresh() {
  const status = document.getElementById("status");
  if (!token()) {
    askToken("");
    return;
  }
  try {
    const lights = (await api("/v1/traffic-lights")).traffic_lights;
    renderLights(lights);
    if (!promotion) {
      status.textContent = "no promotion yet";
      return;
    }
    const q = { promotion_id: promotion };
    const [waves, channels, segments, alerts] = await Promise.all([
      api("/v1/funnel", { ...q, group_by: "wave" }),
      api("/v1/funnel", { ...q, group_by: "channel" }),
      api("/v1/funnel", { ...q, group_by: "segment" }),
      api("/v1/alerts", { ...q, limit: 50 }),
    ]);
    let exp = null;
    try {
      exp = await api("/v1/experiments/" + encodeURIComponent(promotion));
    } catch (e) {
      if (e instanceof AuthError) throw e;
    }
    const waveRows = byWave(waves.rows);
    replace("funnel-chart", funnelChart(waveRows));
    replace("funnel-table", funnelTable(waveRows, "wave"));
    const channelRows = channels.rows.filter((r) => r.sent > 0);
    replace("channel-chart", rateChart(channelRows, "channel", "channel-svg"));
    replace("channel-table", breakdownTable(channelRows, "channel"));
    replace("segment-chart", rateChart(segments.rows, "segment", "segment-svg"));
    replace("segment-table", breakdownTable(segments.rows, "segment"));
    renderAlerts(alerts.alerts);
    renderExperiment(exp);
    document.body.dataset.loaded = promotion;
    status.className = "muted";
    status.textContent = "updated " + new Date().toLocaleTimeString() + ", every " + refreshSeconds + " s";
  } catch (e) {
    if (e instanceof AuthError) {
      askToken(e.message === "403" ? "This token lacks the metrics:read scope." : "The token was not accepted.");
      return;
    }
    status.className = "error";
    status.textContent = "refresh failed: " + e.message;
  }
}

function askToken(reason) {
  document.getElementById("token-form").hidden = false;
  document.getElementById("forget").hidden = true;
  const status = document.getElementById("status");
  status.className = reason ? "error" : "muted";
  status.textContent = reason || "a token with the metrics:read scope is needed";
}

function choose(id) {
  promotion = id;
  const url = new URL(location.href);
  url.searchParams.set("promotion_id", id);
  history.replaceState(null, "", url.pathname + url.search);
  refresh();
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(STORE, document.getElementById("token").value.trim());
  document.getElementById("token").value = "";
  document.getElementById("token-form").hidden = true;
  document.getElementById("forget").hidden = false;
  refresh();
});
document.getElementById("forget").addEventListener("click", () => {
  sessionStorage.removeItem(STORE);
  askToken("");
});
document.getElementById("promotion").addEventListener("change", (event) => choose(event.target.value));

takeTokenFromAddress();
if (token()) document.getElementById("forget").hidden = false;
refresh();
setInterval(refresh, refreshSeconds * 1000);
