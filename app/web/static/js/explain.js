/* Explanation page of a predict job that is still running: poll the job's JSON twin
   (GET /ui/api/jobs/<id>) and reload the page once the job has ended, so that the server
   renders the prediction and its drawing. Without JavaScript a <noscript> meta refresh
   does the same. */
(function () {
  "use strict";
  var M = window.MedMaaS;
  var root = document.getElementById("explanation");
  if (!root || root.getAttribute("data-terminal") === "true") return;
  var url = root.getAttribute("data-job-url");
  var note = document.getElementById("explain-pending");
  var delay = 500;

  function poll() {
    M.getJSON(url).then(function (job) {
      if (job.terminal) { window.location.reload(); return; }
      if (note) note.firstChild.textContent = "Job #" + job.id + " is " + job.state + ": the explanation appears here when it is done. ";
      delay = Math.min(delay * 1.5, 3000);
      window.setTimeout(poll, delay);
    }).catch(function (err) {
      if (err && err.status === 401) { M.signedOut(); return; }
      window.setTimeout(poll, 3000);
    });
  }
  window.setTimeout(poll, delay);
})();
