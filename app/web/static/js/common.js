/* Shared helpers for the MedMaaS pages (no framework; same formatting as app/web/filters.py). */
(function () {
  "use strict";

  function humanDuration(seconds) {
    if (seconds === null || seconds === undefined || isNaN(seconds)) return "—";
    var s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + "s";
    var m = Math.floor(s / 60); s = s % 60;
    if (m < 60) return m + "m " + String(s).padStart(2, "0") + "s";
    var h = Math.floor(m / 60); m = m % 60;
    if (h < 48) return h + "h " + String(m).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }

  function parseTime(value) {
    if (!value) return null;
    var t = Date.parse(value);
    return isNaN(t) ? null : t;
  }

  function age(value) {
    var t = parseTime(value);
    return t === null ? "—" : humanDuration((Date.now() - t) / 1000) + " ago";
  }

  function clock(value) {
    var t = parseTime(value);
    if (t === null) return "—";
    return new Date(t).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC").replace(/Z$/, " UTC");
  }

  function jobDuration(job) {
    if (job.duration_s !== null && job.duration_s !== undefined) return humanDuration(job.duration_s);
    var started = parseTime(job.started_at);
    if (started === null) return "—";
    var end = parseTime(job.finished_at) || Date.now();
    return humanDuration((end - started) / 1000);
  }

  function percent(p) { return Math.round(100 * (p || 0)) + "%"; }

  function fmtNumber(v) {
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    return (a !== 0 && (a < 1e-3 || a >= 1e5)) ? v.toExponential(3) : String(Number(v.toPrecision(4)));
  }

  /* Build an element: el("td", {class: "x", "data-label": "Job"}, [child, "text"]) */
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : v);
    });
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function badge(state) { return el("span", {"class": "badge badge-" + state, text: state}); }

  function getJSON(url) {
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}).then(function (r) {
      if (r.status === 401) {
        var err = new Error("signed out"); err.status = 401; throw err;
      }
      if (!r.ok) { var e = new Error("HTTP " + r.status); e.status = r.status; throw e; }
      return r.json();
    });
  }

  function signedOut() {
    window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
  }

  // The epoch-curve charts of the job and compare pages: one uPlot series per label, in
  // these colours (the compare page's runs table uses the same swatches).
  var CURVE_COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"];

  function curveColor(i) { return CURVE_COLORS[i % CURVE_COLORS.length]; }

  function curveChartOptions(labels, width, pointSize) {
    return {
      width: width, height: 260,
      scales: {x: {time: false}},
      legend: {live: true},
      cursor: {drag: {x: false, y: false}},
      axes: [
        {label: "epoch", stroke: "#475569", grid: {stroke: "#e2e8f0", width: 1}, ticks: {stroke: "#cbd5e1"},
         incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000]},
        {stroke: "#475569", grid: {stroke: "#e2e8f0", width: 1}, ticks: {stroke: "#cbd5e1"}, size: 60,
         values: function (u, vals) { return vals.map(function (v) { return v === null ? "" : fmtNumber(v); }); }}
      ],
      series: [{label: "epoch"}].concat(labels.map(function (label, i) {
        return {label: label, stroke: curveColor(i), width: 2, spanGaps: true,
                points: {show: true, size: pointSize, fill: curveColor(i)},
                value: function (u, v) { return v === null || v === undefined ? "—" : fmtNumber(v); }};
      }))
    };
  }

  window.MedMaaS = {
    humanDuration: humanDuration, age: age, clock: clock, jobDuration: jobDuration, percent: percent,
    fmtNumber: fmtNumber, el: el, badge: badge, getJSON: getJSON, signedOut: signedOut, parseTime: parseTime,
    curveColor: curveColor, curveChartOptions: curveChartOptions
  };
})();
