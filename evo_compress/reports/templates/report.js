// The report page's one script (reports/html.py inlines it and allows it by its hash in the
// page's Content-Security-Policy). plotly.js (4.8 MB with plotly 7) and the figures travel
// gzipped and base64-encoded in data blocks (scripts of type application/gzip, never run): a
// long run's page stays a few MB. This script unpacks them with the browser's
// DecompressionStream, runs plotly.js (allowed by its hash) and draws the figures. The counts
// in body[data-plots] / body[data-rendered] let a test (or a person) check that every plot
// was drawn.
(function () {
  "use strict";
  function unpack(id) {
    var text = atob(document.getElementById(id).textContent.trim());
    var bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i += 1) {
      bytes[i] = text.charCodeAt(i);
    }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text();
  }
  function fail(error) {
    document.body.setAttribute("data-error", String(error));
    throw error;
  }
  if (typeof DecompressionStream === "undefined") {
    fail(new Error("this browser cannot unpack the figures (no DecompressionStream): " +
      "open the report in a browser from 2023 or later, or see the PNGs beside it"));
  }
  Promise.all([unpack("plotly-js"), unpack("report-figures")]).then(function (texts) {
    var library = document.createElement("script");
    library.textContent = texts[0];
    document.head.appendChild(library);
    var figures = JSON.parse(texts[1]);
    var config = {displaylogo: false, responsive: true};
    var drawn = 0;
    // A trace's "columns" names the figure's shared value lists to use ("marker.color": one
    // level down): a long run's values are written once, not once per panel.
    figures.forEach(function (figure) {
      figure.data.forEach(function (trace) {
        Object.keys(trace.columns || {}).forEach(function (key) {
          var path = key.split("."), values = figure.columns[trace.columns[key]];
          if (path.length === 2) {
            trace[path[0]][path[1]] = values;
          } else {
            trace[key] = values;
          }
        });
        delete trace.columns;
      });
    });
    return Promise.all(figures.map(function (figure) {
      return Plotly.newPlot(figure.div, figure.data, figure.layout, config).then(function () {
        drawn += 1;
        document.body.setAttribute("data-rendered", String(drawn));
      });
    }));
  }).catch(fail);
})();
