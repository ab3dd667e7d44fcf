// lagprobe's /test/ live mode (?watch=1): the server streams each new probe as the page's
// live part, already drawn (server-sent events from /test/events with the same query),
// and this script swaps it in. The lab's form sits outside that part, so that a value
// being typed is not redrawn away; its values are refreshed from the part's #lab-link
// instead, which says the link's settings as data (they may change in another tab or
// through the API). No dependencies, no build step; without JavaScript the page reloads
// itself instead (a <noscript> refresh).
"use strict";

(() => {
  const live = document.getElementById("live");
  const status = document.getElementById("live-status");
  if (!live || !status || !("EventSource" in window)) {
    return;
  }
  // Inputs the visitor has typed into since the page loaded: theirs until they submit
  // (which reloads the page), so a refresh never overwrites a value they have not sent.
  const edited = new Set();
  const input = (name) => document.querySelector("#lab-controls input[name='" + name + "']");
  for (const name of ["delay_ms", "jitter_ms"]) {
    const field = input(name);
    if (field) {
      field.addEventListener("input", () => edited.add(field));
    }
  }
  const refresh = (field, value) => {
    if (field && value !== undefined && field !== document.activeElement && !edited.has(field)) {
      field.value = value;
    }
  };
  const refreshLabControls = () => {
    const link = document.getElementById("lab-link");
    if (!link) {
      return;
    }
    refresh(input("delay_ms"), link.dataset.delayMs);
    refresh(input("jitter_ms"), link.dataset.jitterMs);
    const cut = document.getElementById("cut-link");
    const linkDown = input("link_down");
    if (cut && linkDown && link.dataset.linkDown !== undefined) {
      const down = link.dataset.linkDown === "true";
      // The button toggles: a cut link offers healing.
      linkDown.value = down ? "false" : "true";
      cut.textContent = down ? cut.dataset.healWords : cut.dataset.cutWords;
    }
  };

  const source = new EventSource("/test/events" + window.location.search);
  let received = 0;
  status.textContent = "Live mode: waiting for the first probe…";
  source.addEventListener("probe", (event) => {
    live.innerHTML = event.data;
    refreshLabControls();
    received += 1;
    document.body.dataset.probesStreamed = String(received);
    status.textContent =
      "Live mode: " + received + (received === 1 ? " probe" : " probes") +
      " streamed in; the charts and the lab's form follow each.";
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself; say so rather than fail silently.
    status.textContent = "Live mode: connection lost, reconnecting…";
  });
})();
