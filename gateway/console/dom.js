// Small DOM helpers. Text always goes in as text nodes (never parsed as HTML), so names and messages
// from the API cannot inject markup.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// A table: `columns` are [heading, row => cell] pairs; `rows` the items; `attributes` go on <table>.
export function table(columns, rows, attributes = {}) {
  if (!rows.length) return h("p", { class: "empty" }, attributes.empty ?? "Nothing yet.");
  const { empty, ...rest } = attributes;
  return h("table", rest,
    h("thead", {}, h("tr", {}, columns.map(([heading]) => h("th", { scope: "col" }, heading)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row)))))));
}

// A definition list from [term, value] pairs (values may be nodes).
export function facts(pairs, attributes = {}) {
  return h("dl", { class: "facts", ...attributes },
    pairs.filter(([, value]) => value !== undefined && value !== null && value !== "")
      .map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

export const badge = (state) => h("span", { class: `badge state-${String(state).toLowerCase()}` }, state || "—");
export const link = (href, text) => h("a", { href }, text);

const integer = new Intl.NumberFormat("en");
export const count = (value) => (typeof value === "number" ? integer.format(value) : "—");

export function number(value, digits = 4) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "—";
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e6)) return value.toExponential(2);
  return String(Number(value.toPrecision(digits)));
}

export function bytes(value) {
  if (typeof value !== "number") return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let scaled = value, unit = 0;
  while (scaled >= 1024 && unit < units.length - 1) { scaled /= 1024; unit += 1; }
  return `${unit ? scaled.toFixed(1) : scaled} ${units[unit]}`;
}

export function when(timestamp) {
  if (!timestamp) return "—";
  const date = new Date(timestamp);
  return Number.isNaN(date.getTime()) ? String(timestamp) : date.toLocaleString();
}

export const shortId = (id) => (id ? String(id).slice(0, 8) : "—");
export const encode = encodeURIComponent;

export function progressBar(done = 0, total = 0) {
  const fraction = total ? Math.min(1, done / total) : 0;
  return h("span", { class: "progress", title: `${done} / ${total}` },
    h("progress", { max: 100, value: Math.round(fraction * 100) }), ` ${count(done)} / ${count(total)}`);
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" },
    error?.status ? `${error.status} ${error.type}: ${error.message}` : String(error?.message ?? error));
}
