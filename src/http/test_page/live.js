// lagprobe's /test/ live mode (?watch=1): the server streams each new probe as the page's
// live part, already drawn (server-sent events from /test/events with the same query),
// and this script swaps it in. No dependencies, no build step; without JavaScript the page
// reloads itself instead (a <noscript> refresh).
"use strict";

(() => {
  const live = document.getElementById("live");
  const status = document.getElementById("live-status");
  if (!live || !status || !("EventSource" in window)) {
    return;
  }
  const source = new EventSource("/test/events" + window.location.search);
  let received = 0;
  status.textContent = "Live mode: waiting for the first probe…";
  source.addEventListener("probe", (event) => {
    live.innerHTML = event.data;
    received += 1;
    document.body.dataset.probesStreamed = String(received);
    status.textContent =
      "Live mode: " + received + (received === 1 ? " probe" : " probes") +
      " streamed in; the charts redraw with each.";
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself; say so rather than fail silently.
    status.textContent = "Live mode: connection lost, reconnecting…";
  });
})();
