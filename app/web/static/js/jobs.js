/* Jobs list: re-render the table from the session-authenticated JSON every 2 s. */
(function () {
  "use strict";
  var M = window.MedMaaS, el = M.el;
  var table = document.getElementById("jobs-table");
  if (!table) return;
  var url = table.getAttribute("data-api-url");
  var tbody = document.getElementById("job-rows");
  var empty = document.getElementById("jobs-empty");
  var status = document.getElementById("live-status");
  var INTERVAL_MS = 2000;

  function row(job) {
    var model = job.model_url ? el("a", {href: job.model_url, text: job.model_name})
      : (job.model_name ? document.createTextNode(job.model_name) : el("span", {"class": "muted", text: "—"}));
    var state = [M.badge(job.state)];
    if (job.cancel_requested && !job.terminal) state.push(" ", el("span", {"class": "muted small", text: "cancelling"}));
    var progress = el("progress", {max: "1", value: String(job.progress), "aria-label": "Job " + job.id + " progress",
                                   text: M.percent(job.progress)});
    // the compare checkbox keeps its tick across refreshes (app/web/templates/macros.html job_row)
    var pick = el("input", {type: "checkbox", name: "ids", value: String(job.id), form: "compare-form",
                            "class": "compare-pick", "aria-label": "Select job " + job.id + " to compare",
                            checked: !!picked[job.id]});
    var tags = (job.tags || []).reduce(function (out, t) { out.push(" ", el("span", {"class": "tag", text: t})); return out; }, []);
    return el("tr", {"data-job-id": String(job.id), "data-state": job.state}, [
      el("td", {"data-label": "Compare", "class": "select-cell"}, [pick]),
      el("td", {"data-label": "Job"}, [el("a", {href: job.url, text: "#" + job.id})].concat(tags)),
      el("td", {"data-label": "Kind", text: job.kind}),
      el("td", {"data-label": "Model"}, [model]),
      el("td", {"data-label": "State"}, state),
      el("td", {"data-label": "Progress", "class": "progress-cell"}, [progress, el("span", {"class": "pct", text: M.percent(job.progress)})]),
      el("td", {"data-label": "Age"}, [el("time", {datetime: job.created_at, title: M.clock(job.created_at), text: M.age(job.created_at)})]),
      el("td", {"data-label": "Duration", text: M.jobDuration(job)})
    ]);
  }

  var picked = {};
  function render(data) {
    picked = {};
    Array.prototype.forEach.call(tbody.querySelectorAll("input.compare-pick:checked"), function (box) { picked[box.value] = true; });
    var frag = document.createDocumentFragment();
    data.items.forEach(function (job) { frag.appendChild(row(job)); });
    tbody.replaceChildren(frag);
    empty.hidden = data.items.length > 0;
    var total = 0;
    Object.keys(data.counts || {}).forEach(function (s) {
      total += data.counts[s];
      var c = document.querySelector('[data-count="' + s + '"]');
      if (c) c.textContent = data.counts[s];
    });
    var all = document.querySelector('[data-count="all"]');
    if (all) all.textContent = total;
    status.textContent = "Live · updated " + new Date().toLocaleTimeString();
  }

  var timer = null;
  function tick() {
    timer = null;
    if (document.hidden) { schedule(); return; }
    M.getJSON(url).then(render).catch(function (err) {
      if (err.status === 401) { M.signedOut(); return; }
      status.textContent = "Live updates paused (" + err.message + "); retrying…";
    }).then(schedule);
  }
  function schedule() { if (!timer) timer = setTimeout(tick, INTERVAL_MS); }
  document.addEventListener("visibilitychange", function () { if (!document.hidden) { clearTimeout(timer); timer = null; tick(); } });
  schedule();
})();
