/* Small conveniences for the submit forms; every form also works without JavaScript. */
(function () {
  "use strict";

  // Generic form: switching kind loads that kind's defaults and field help, unless the
  // spec was edited (then the edits are kept).
  var kind = document.querySelector("select[data-reload-on-change]");
  var spec = document.getElementById("spec");
  var defaultsNode = document.getElementById("spec-defaults");
  if (kind && spec && defaultsNode) {
    var defaults = JSON.parse(defaultsNode.textContent);
    var current = kind.value;
    kind.addEventListener("change", function () {
      if (spec.value.trim() === (defaults[current] || "").trim()) {
        window.location.search = "?kind=" + encodeURIComponent(kind.value);
      }
      current = kind.value;
    });
  }

  // Training form: the dataset decides the architecture and suggests target columns.
  var dataset = document.getElementById("dataset_id");
  var arch = document.getElementById("arch");
  var targets = document.getElementById("target-options");
  if (dataset && arch && targets) {
    var sync = function () {
      var opt = dataset.options[dataset.selectedIndex];
      if (!opt || !opt.value) return;
      var dsKind = opt.getAttribute("data-kind");
      if (dsKind === "sequences") arch.value = "rnn";
      if (dsKind === "images") arch.value = "cnn";
      var labels = (opt.getAttribute("data-labels") || "").split(",").filter(Boolean);
      targets.replaceChildren.apply(targets, labels.map(function (l) {
        var o = document.createElement("option"); o.value = l; return o;
      }));
    };
    dataset.addEventListener("change", sync);
    sync();
  }
})();
