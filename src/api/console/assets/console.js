// The leasehold console's own script: new approvals appear without a
// reload (server-sent events; htmx swaps the list in). Nothing else needs
// it: every page works without JavaScript.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  var notice = null;
  function dirty(section) {
    // never throw away a comment an approver is typing, nor an error shown
    // next to the form it is about
    if (section.querySelector(".error")) return true;
    var fields = section.querySelectorAll("textarea");
    for (var i = 0; i < fields.length; i++) if (fields[i].value) return true;
    return false;
  }
  var source = new EventSource(live.getAttribute("data-events"));
  source.addEventListener("changed", function (event) {
    var section = document.getElementById("approvals");
    if (!section || !window.htmx) return;
    // the list on screen is already this set (a reconnect says so again)
    if (section.getAttribute("data-fingerprint") === event.data) return;
    if (dirty(section)) {
      if (!notice) {
        notice = document.createElement("p");
        notice.className = "notice";
        notice.textContent = "The list changed; it will refresh once your comment is sent (or reload).";
        section.parentNode.insertBefore(notice, section);
      }
      return;
    }
    if (notice) { notice.remove(); notice = null; }
    window.htmx.trigger(section, "refresh");
  });
})();
