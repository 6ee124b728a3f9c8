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
