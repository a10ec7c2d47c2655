/* Compare runs: one uPlot chart per metric with one line per run, overlaid on the union of
   their epochs. The data is the page's embedded JSON (GET /api/v1/jobs/compare's answer);
   the colours are the job page's (static/js/job.js) and the runs table's swatches. */
(function () {
  "use strict";
  var M = window.MedMaaS;
  var node = document.getElementById("compare-data");
  if (!node || typeof window.uPlot !== "function") return;
  var data = JSON.parse(node.textContent);
  var COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"];
  var plots = [];

  function options(width) {
    return {
      width: width, height: 260,
      scales: {x: {time: false}},
      legend: {live: true},
      cursor: {drag: {x: false, y: false}},
      axes: [
        {label: "epoch", stroke: "#475569", grid: {stroke: "#e2e8f0", width: 1}, ticks: {stroke: "#cbd5e1"},
         incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000]},
        {stroke: "#475569", grid: {stroke: "#e2e8f0", width: 1}, ticks: {stroke: "#cbd5e1"}, size: 60,
         values: function (u, vals) { return vals.map(function (v) { return v === null ? "" : M.fmtNumber(v); }); }}
      ],
      series: [{label: "epoch"}].concat(data.jobs.map(function (job, i) {
        var colour = COLORS[i % COLORS.length];
        return {label: job.label || "#" + job.id, stroke: colour, width: 2, spanGaps: true,
                points: {show: true, size: 5, fill: colour},
                value: function (u, v) { return v === null || v === undefined ? "—" : M.fmtNumber(v); }};
      }))
    };
  }

  function draw(host) {
    var key = host.getAttribute("data-metric");
    var xs = {};
    data.jobs.forEach(function (job) {
      (job.curves[key] || []).forEach(function (p) { xs[p[0]] = true; });
    });
    var xValues = Object.keys(xs).map(Number).sort(function (a, b) { return a - b; });
    var columns = data.jobs.map(function (job) {
      var byX = {};
      (job.curves[key] || []).forEach(function (p) { byX[p[0]] = p[1]; });
      return xValues.map(function (x) { return x in byX ? byX[x] : null; });
    });
    var width = Math.max(240, host.clientWidth || host.parentNode.clientWidth || 300);
    plots.push({host: host, plot: new window.uPlot(options(width), [xValues].concat(columns), host)});
    var drawn = data.jobs.filter(function (job) { return (job.curves[key] || []).length > 0; });
    host.setAttribute("data-series", String(drawn.length));
    host.setAttribute("data-jobs", drawn.map(function (job) { return job.id; }).join(","));
    host.setAttribute("data-points", String(xValues.length));
  }

  Array.prototype.forEach.call(document.querySelectorAll(".compare-chart"), draw);
  window.addEventListener("resize", function () {
    plots.forEach(function (p) { if (p.host.clientWidth) p.plot.setSize({width: p.host.clientWidth, height: 260}); });
  });
})();
