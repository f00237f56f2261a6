// Click a header to sort by that column (numbers numerically); click again to reverse. A cell's
// data-sort, when given, is what it sorts by.
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var up = th.dataset.order !== "up"; th.dataset.order = up ? "up" : "down";
      var key = function (row) {
        var marked = row.cells[column].querySelector("[data-sort]");
        return marked ? marked.dataset.sort : row.cells[column].textContent;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var d = (x !== "" && y !== "" && !isNaN(x) && !isNaN(y)) ? x - y : x.localeCompare(y);
        return up ? d : -d;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
