/* Compare runs: one uPlot chart per metric with one line per run, overlaid on the union of
   their epochs. The data is the page's embedded JSON (GET /api/v1/jobs/compare's answer);
   the chart options and colours are common.js's, matching the runs table's swatches. */
(function () {
  "use strict";
  var M = window.MedMaaS;
  var node = document.getElementById("compare-data");
  if (!node || typeof window.uPlot !== "function") return;
  var data = JSON.parse(node.textContent);
  var plots = [];

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
    var labels = data.jobs.map(function (job) { return job.label || "#" + job.id; });
    plots.push({host: host, plot: new window.uPlot(M.curveChartOptions(labels, width, 5), [xValues].concat(columns), host)});
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
