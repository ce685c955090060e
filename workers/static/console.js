// The console's only script besides htmx: no inline script or handler attributes (the CSP forbids them).
// A form with data-confirm asks first; a select with data-autosubmit submits its form when changed.
document.addEventListener("submit", function (e) {
  var msg = e.target.getAttribute && e.target.getAttribute("data-confirm");
  if (msg && !window.confirm(msg)) { e.preventDefault(); }
}, true);
document.addEventListener("change", function (e) {
  if (e.target.matches && e.target.matches("select[data-autosubmit]") && e.target.form) { e.target.form.submit(); }
});
