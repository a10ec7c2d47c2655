/* Job detail: live progress/ETA, metric curves (uPlot), events log and state, fed by a
   session-authenticated EventSource (GET /ui/api/jobs/<id>/stream), with JSON polling as
   the fallback when the stream cannot be used. */
(function () {
  "use strict";
  var M = window.MedMaaS, el = M.el;
  var root = document.getElementById("job");
  if (!root) return;

  var job = JSON.parse(document.getElementById("job-data").textContent);
  var jobUrl = root.getAttribute("data-job-url");
  var eventsUrl = root.getAttribute("data-events-url");
  var streamUrl = root.getAttribute("data-stream-url");
  var liveStatus = document.getElementById("live-status");
  var cancelDialog = document.getElementById("cancel-dialog");

  var lastSeq = 0;
  var MAX_LOG_ROWS = 300;
  var TERMINAL = {succeeded: true, failed: true, cancelled: true};
  var STREAM_TYPES = ["state", "progress", "metric", "log", "cancel_requested", "checkpoint", "warning", "message"];
  var source = null, pollTimer = null;

  /* ---------------------------------------------------------------- job facts */
  function text(id, value) { var n = document.getElementById(id); if (n) n.textContent = value; }

  function applyJob(j) {
    job = j;
    var badge = document.getElementById("job-state");
    badge.className = "badge badge-" + j.state;
    badge.textContent = j.state;
    text("fact-state", j.state + (j.cancel_requested && !j.terminal ? " (cancel requested)" : ""));
    text("fact-attempts", j.attempts + " of " + j.max_attempts);
    text("fact-worker", j.worker || "—");
    text("fact-started", M.clock(j.started_at));
    text("fact-finished", M.clock(j.finished_at));
    text("fact-duration", M.jobDuration(j));
    var model = document.getElementById("fact-model");
    if (j.model_url) {
      model.replaceChildren(el("a", {href: j.model_url, text: j.model_name}), j.model_version ? " v" + j.model_version : "");
      var link = document.getElementById("model-link");
      link.href = j.model_url; link.textContent = "Model " + j.model_name; link.hidden = false;
    } else {
      model.textContent = j.model_name || "—";
    }
    var cancelForm = document.getElementById("cancel-form");
    cancelForm.hidden = !!j.terminal;
    var deleteLink = document.getElementById("delete-link");
    if (deleteLink) deleteLink.hidden = !j.terminal;
    var cancelButton = document.getElementById("cancel-button");
    cancelButton.disabled = !!j.cancel_requested;
    cancelButton.textContent = j.cancel_requested ? "Cancelling…" : "Cancel job";
    document.getElementById("result-link").hidden = !j.result_url;
    var ready = document.getElementById("results-ready"); // a score job finished while open
    if (ready && j.state === "succeeded") ready.hidden = false;
    var errBox = document.getElementById("job-error");
    errBox.hidden = !j.error;
    text("job-error-text", j.error || "");
    text("job-result", j.result === null || j.result === undefined ? "—" : JSON.stringify(j.result, null, 2));
    if (j.terminal && cancelDialog && cancelDialog.open) cancelDialog.close();
    paintProgress(j);
    if (j.terminal && rows.size === 0) text("metrics-latest", "This job reported no metrics.");
    if (j.terminal) liveStatus.textContent = "Job finished";
  }

  var refreshing = null;
  function refreshJob() {
    if (refreshing) return refreshing;
    refreshing = M.getJSON(jobUrl).then(applyJob).catch(onFetchError).then(function () { refreshing = null; });
    return refreshing;
  }

  function onFetchError(err) {
    if (err && err.status === 401) { M.signedOut(); return; }
    liveStatus.textContent = "Live updates interrupted (" + (err && err.message) + "); retrying…";
  }

  /* ---------------------------------------------------------------- progress + ETA */
  var eta = null; // {seconds, at (ms since epoch)}

  function setProgress(p, message, etaS, ts, terminal) {
    var bar = document.getElementById("job-progress");
    if (typeof p === "number") { bar.value = p; bar.textContent = M.percent(p); text("progress-pct", M.percent(p)); }
    if (message !== undefined && message !== null) text("progress-message", message);
    if (typeof etaS === "number") eta = {seconds: etaS, at: M.parseTime(ts) || Date.now()};
    if (terminal) eta = null;
    renderEta();
  }

  // The bar's final look: succeeded full and green, failed red with the error's first
  // line, cancelled grey and labelled with where it stopped (colours: data-state in app.css).
  function paintProgress(j) {
    var bar = document.getElementById("job-progress");
    bar.setAttribute("data-state", j.state);
    document.getElementById("progress-text").setAttribute("data-state", j.state);
    if (!j.terminal) { setProgress(j.progress, j.message, null, null, false); return; }
    var p = j.state === "succeeded" ? 1 : (j.progress || 0);
    bar.value = p;
    bar.textContent = j.progress_label;
    text("progress-pct", j.progress_label);
    text("progress-message", j.state === "failed" ? (j.error_line || "") : (j.message || ""));
    eta = null;
    renderEta();
  }

  function renderEta() {
    var node = document.getElementById("progress-eta");
    if (job.terminal || job.state !== "running") { node.textContent = ""; return; }
    if (eta) {
      var left = Math.max(0, eta.seconds - (Date.now() - eta.at) / 1000);
      node.textContent = "ETA " + M.humanDuration(left);
      return;
    }
    var started = M.parseTime(job.started_at), p = job.progress;
    var bar = document.getElementById("job-progress");
    p = Math.max(p || 0, bar.value || 0);
    if (started && p >= 0.02 && p < 1) {
      var elapsed = (Date.now() - started) / 1000;
      node.textContent = "ETA ~" + M.humanDuration(elapsed * (1 - p) / p);
    } else {
      node.textContent = "";
    }
  }

  setInterval(function () {
    renderEta();
    if (!job.terminal) text("fact-duration", M.jobDuration(job));
  }, 1000);

  /* ---------------------------------------------------------------- metrics + charts */
  var rows = new Map();            // x (epoch or step) -> merged metric values
  var lossKeys = [], valKeys = [];
  // Curves are losses and quality metrics; bookkeeping numbers (epoch counters, timings,
  // learning rate) stay in the events log.
  var SKIP = {epoch: 1, step: 1, attempt: 1, lr: 1, batch: 1, global_step: 1, eta_s: 1};
  function isCurve(k) { return !SKIP[k] && !/(^best_|epoch|_s$|_seconds$|_sec$|_time$|^time)/.test(k); }
  var charts = {};
  var renderPending = false;

  // Event data may arrive with keys in any order (PostgreSQL JSONB reorders them):
  // show train_* first, then val_*, then test_*, then the rest, each alphabetically.
  function rank(k) { return /^train/.test(k) ? 0 : /^val/.test(k) ? 1 : /^test/.test(k) ? 2 : 3; }
  function byPrefix(a, b) { return rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0); }

  function xOf(d) {
    if (typeof d.epoch === "number") return d.epoch;
    if (typeof d.step === "number") return d.step;
    return rows.size + 1;
  }

  function addMetric(d) {
    var x = xOf(d);
    var row = rows.get(x) || {};
    Object.keys(d).forEach(function (k) {
      row[k] = d[k];
      if (typeof d[k] !== "number" || !isCurve(k)) return;
      var target = /loss/.test(k) ? lossKeys : valKeys;
      if (target.indexOf(k) < 0) { target.push(k); target.sort(byPrefix); }
    });
    rows.set(x, row);
    if (!renderPending) { renderPending = true; requestAnimationFrame(renderMetrics); }
  }

  function drawChart(name, keys, xs) {
    var host = document.getElementById("chart-" + name);
    var figure = host.parentNode;
    figure.hidden = keys.length === 0;
    if (!keys.length || typeof window.uPlot !== "function") return;
    var data = [xs].concat(keys.map(function (k) {
      return xs.map(function (x) { var v = rows.get(x)[k]; return (typeof v === "number" && isFinite(v)) ? v : null; });
    }));
    var points = xs.filter(function (x) {
      return keys.some(function (k) { return typeof rows.get(x)[k] === "number"; });
    }).length;
    var signature = keys.join(",");
    var width = Math.max(240, host.clientWidth || figure.clientWidth || 300);
    var chart = charts[name];
    if (chart && chart.signature === signature) {
      chart.plot.setData(data);
    } else {
      if (chart) chart.plot.destroy();
      host.replaceChildren();
      charts[name] = {signature: signature, plot: new window.uPlot(M.curveChartOptions(keys, width, 6), data, host)};
    }
    host.setAttribute("data-points", String(points));
    host.setAttribute("data-series", signature);
  }

  function renderMetrics() {
    renderPending = false;
    var xs = Array.from(rows.keys()).sort(function (a, b) { return a - b; });
    if (!xs.length) return;
    document.getElementById("charts").hidden = false;
    document.getElementById("metrics-details").hidden = false;
    drawChart("loss", lossKeys, xs);
    drawChart("val", valKeys, xs);
    var last = rows.get(xs[xs.length - 1]);
    var parts = [("epoch" in last ? "Epoch " + last.epoch : "Step " + xs[xs.length - 1])];
    lossKeys.concat(valKeys).forEach(function (k) { if (k in last) parts.push(k + "\u00a0" + M.fmtNumber(last[k])); });
    text("metrics-latest", "Latest: " + parts.join(" · "));
    renderMetricsTable(xs);
  }

  function renderMetricsTable(xs) {
    var table = document.getElementById("metrics-table");
    var keys = lossKeys.concat(valKeys);
    var head = el("tr", {}, [el("th", {scope: "col", text: "epoch"})].concat(keys.map(function (k) {
      return el("th", {scope: "col", text: k});
    })));
    table.tHead.replaceChildren(head);
    var frag = document.createDocumentFragment();
    xs.forEach(function (x) {
      var r = rows.get(x);
      frag.appendChild(el("tr", {}, [el("th", {scope: "row", text: String(x)})].concat(keys.map(function (k) {
        return el("td", {text: k in r ? M.fmtNumber(r[k]) : "—"});
      }))));
    });
    table.tBodies[0].replaceChildren(frag);
  }

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (name) {
      var host = document.getElementById("chart-" + name);
      if (host.clientWidth) charts[name].plot.setSize({width: host.clientWidth, height: 260});
    });
  });

  /* ---------------------------------------------------------------- events log */
  function summary(ev) {
    var d = ev.data || {};
    if (ev.type === "progress") {
      return M.percent(d.progress) + (d.message ? " · " + d.message : "") +
        (typeof d.eta_s === "number" ? " · ETA " + M.humanDuration(d.eta_s) : "");
    }
    if (ev.type === "state") {
      var s = (d.from ? d.from + " → " : "→ ") + d.to + " (attempt " + d.attempt + ")";
      if (d.worker) s += " on " + d.worker;
      if (d.reason) s += " · " + d.reason;
      if (d.error) s += " · " + d.error;
      return s;
    }
    if (ev.type === "metric") {
      return Object.keys(d).map(function (k) { return k + " " + M.fmtNumber(d[k]); }).join(" · ");
    }
    if (ev.type === "log" && d.message) return d.message;
    var json = JSON.stringify(d);
    return json.length > 300 ? json.slice(0, 300) + "…" : json;
  }

  var logBody = document.getElementById("event-rows");
  function logEvent(ev) {
    var tr = el("tr", {"data-seq": String(ev.seq), "class": "ev-" + ev.type}, [
      el("td", {"class": "num", text: String(ev.seq)}),
      el("td", {"class": "nowrap"}, [el("time", {datetime: ev.ts, text: M.clock(ev.ts).slice(11, 19), title: M.clock(ev.ts)})]),
      el("td", {}, [el("span", {"class": "tag tag-" + ev.type, text: ev.type})]),
      el("td", {"class": "details", text: summary(ev)})
    ]);
    logBody.insertBefore(tr, logBody.firstChild);
    while (logBody.rows.length > MAX_LOG_ROWS) logBody.deleteRow(logBody.rows.length - 1);
  }

  /* ---------------------------------------------------------------- event intake */
  function handle(ev) {
    if (ev.seq <= lastSeq) return; // already seen (replay after a reconnect)
    lastSeq = ev.seq;
    logEvent(ev);
    var d = ev.data || {};
    if (ev.type === "progress") {
      if (!job.terminal) { // a finished job's bar shows its outcome, not replayed history
        job.progress = d.progress;
        setProgress(d.progress, d.message, d.eta_s, ev.ts, false);
      }
    } else if (ev.type === "metric") {
      addMetric(d);
    } else if (ev.type === "state" || ev.type === "cancel_requested") {
      refreshJob();
    }
  }

  function backfill(upTo) {
    // Events of types the stream listener does not name, or missed while reconnecting.
    var url = eventsUrl + "?after=" + lastSeq + (upTo ? "&limit=" + Math.max(1, upTo - lastSeq) : "");
    return M.getJSON(url).then(function (data) { data.items.forEach(handle); return data; });
  }

  var chain = Promise.resolve();
  function enqueue(task) { chain = chain.then(task).catch(onFetchError); return chain; }

  function loadHistory() {
    function page() {
      return M.getJSON(eventsUrl + "?after=" + lastSeq + "&limit=10000").then(function (data) {
        data.items.forEach(handle);
        if (data.items.length === 10000) return page();
        return data;
      });
    }
    return page();
  }

  function openStream() {
    if (!window.EventSource) { startPolling(); return; }
    source = new EventSource(streamUrl + "?after=" + lastSeq);
    liveStatus.textContent = "Live";
    STREAM_TYPES.forEach(function (type) {
      source.addEventListener(type, function (msg) {
        var ev = JSON.parse(msg.data);
        enqueue(function () { return ev.seq > lastSeq + 1 ? backfill(ev.seq - 1) : null; });
        enqueue(function () { handle(ev); });
      });
    });
    source.addEventListener("end", function () {
      source.close(); source = null;
      enqueue(function () { return backfill(); });
      enqueue(refreshJob);
      enqueue(function () { liveStatus.textContent = "Job finished"; });
    });
    source.addEventListener("open", function () { liveStatus.textContent = "Live"; });
    source.onerror = function () {
      if (source && source.readyState === EventSource.CLOSED) {
        source = null;
        startPolling(); // e.g. signed out (401) or a proxy that refuses streams
      } else {
        liveStatus.textContent = "Reconnecting…";
      }
    };
  }

  function startPolling() {
    if (pollTimer) return;
    liveStatus.textContent = "Live (polling)";
    pollTimer = setInterval(function () {
      enqueue(function () {
        return backfill().then(function (data) {
          if (TERMINAL[data.state]) { clearInterval(pollTimer); pollTimer = null; liveStatus.textContent = "Job finished"; }
        });
      });
      enqueue(refreshJob);
    }, 2000);
  }

  /* ---------------------------------------------------------------- cancel, confirmed first */
  var cancelForm = document.getElementById("cancel-form");
  if (cancelDialog && typeof cancelDialog.showModal === "function") {
    // The form alone (no script) opens the confirmation page; here a dialog asks instead.
    cancelForm.addEventListener("submit", function (e) {
      e.preventDefault();
      if (!cancelDialog.open && !job.terminal) cancelDialog.showModal();
    });
    document.getElementById("cancel-keep").addEventListener("click", function () { cancelDialog.close(); });
    document.getElementById("cancel-confirm-form").addEventListener("submit", function () {
      document.getElementById("cancel-confirm").disabled = true; // one request per click
    });
  }

  applyJob(job);
  enqueue(loadHistory);
  enqueue(refreshJob); // the history replays old progress values; the row has the current one
  enqueue(function () {
    if (job.terminal) { liveStatus.textContent = "Job finished"; return; }
    openStream();
  });
})();
