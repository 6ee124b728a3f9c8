// Live run page: re-render the run's body whenever its record changes (server-sent events).
// No polling: the server pushes one event per change and closes the stream when the run ends.
(function () {
  "use strict";
  var box = document.getElementById("run-body");
  if (!box || !window.EventSource) { return; }
  var source = new EventSource(box.dataset.live);
  var refresh = function () {
    fetch(box.dataset.body, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        // The fragment is rendered by the server with every value escaped; parse it inertly.
        var doc = new DOMParser().parseFromString(html, "text/html");
        box.replaceChildren.apply(box, Array.prototype.slice.call(doc.body.childNodes));
      });
  };
  source.addEventListener("run", refresh);
  source.onerror = function () { source.close(); };
})();

// Live logs panel: append each record the server pushes (built with textContent, so a message is
// never markup), and filter the rows by step and lowest level.
(function () {
  "use strict";
  var panel = document.getElementById("logs");
  if (!panel) { return; }
  var lines = document.getElementById("log-lines");
  var where = document.getElementById("log-where");
  var level = document.getElementById("log-level");
  var state = document.getElementById("log-state");
  var rank = { debug: 0, info: 1, warning: 2, error: 3, critical: 4 };
  var show = function (row) {
    var okWhere = !where.value || row.dataset.where === where.value;
    var okLevel = (rank[row.dataset.level] || 0) >= (rank[level.value] || 0);
    row.hidden = !(okWhere && okLevel);
  };
  var filter = function () { Array.prototype.forEach.call(lines.rows, show); };
  where.addEventListener("change", filter);
  level.addEventListener("change", filter);
  var cell = function (row, text, cls) {
    var td = row.insertCell();
    td.textContent = text;
    if (cls) { td.className = cls; }
  };
  var time = function (ms) {
    return new Date(ms).toISOString().replace("T", " ").replace("Z", "");
  };
  if (!window.EventSource) { return; }
  var source = new EventSource(panel.dataset.live);
  source.addEventListener("log", function (e) {
    var r = JSON.parse(e.data);
    var empty = document.getElementById("log-empty");
    if (empty) { empty.remove(); }
    var row = lines.insertRow();
    row.className = "log l-" + r.level + (r.marker ? " marker" : "");
    row.dataset.where = r.where;
    row.dataset.level = r.level;
    cell(row, time(r.ts));
    cell(row, r.level);
    cell(row, r.where + " #" + (r.attempt || 1));
    cell(row, r.message, "msg");
    var fields = r.fields || {};
    cell(row, Object.keys(fields).map(function (k) {
      var v = fields[k];
      return k + "=" + (typeof v === "string" ? v : JSON.stringify(v));
    }).join(" "), "fields");
    if (!Array.prototype.some.call(where.options, function (o) { return o.value === r.where; })) {
      var option = document.createElement("option");
      option.value = r.where;
      option.textContent = r.where;
      where.appendChild(option);
    }
    show(row);
  });
  var end = function (text) { source.close(); state.textContent = text; };
  source.addEventListener("end", function () { end("the run has ended"); });
  source.addEventListener("failed", function (e) { end("logs stopped: " + JSON.parse(e.data)); });
  source.onerror = function () { end("logs stopped: connection lost (reload to resume)"); };
})();
