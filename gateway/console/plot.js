// Line charts drawn as inline SVG: no library, no canvas, readable in the DOM (and by tests).

const SVG = "http://www.w3.org/2000/svg";
const MARGIN = { top: 12, right: 16, bottom: 34, left: 56 };

function svg(tag, attributes = {}, text) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// About `count` round tick values covering [low, high] (1, 2, 5 × 10^k steps).
export function ticks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const raw = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const values = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    values.push(Number(value.toPrecision(12)));
  }
  return values;
}

function extent(values) {
  let low = Math.min(...values), high = Math.max(...values);
  if (low === high) { const pad = Math.abs(low) * 0.05 || 1; low -= pad; high += pad; }
  return [low, high];
}

const label = (value) => (Math.abs(value) >= 1e4 || (value !== 0 && Math.abs(value) < 1e-3)
  ? value.toExponential(1) : String(Number(value.toPrecision(4))));

// series: [{name, points: [{step, value}], className}] → an <svg class="chart"> with one path per
// non-empty series, axes with ticks, and a legend. Each path carries data-series and data-points.
export function lineChart(series, { title = "", width = 640, height = 240, xLabel = "step" } = {}) {
  const drawn = series.filter((s) => s.points?.length);
  const root = svg("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": title || drawn.map((s) => s.name).join(", "),
  });
  if (title) root.append(svg("title", {}, title));
  if (!drawn.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty" },
      "no points yet"));
    return root;
  }
  const all = drawn.flatMap((s) => s.points);
  const [x0, x1] = extent(all.map((p) => p.step));
  const [y0, y1] = extent(all.map((p) => p.value));
  const plotW = width - MARGIN.left - MARGIN.right, plotH = height - MARGIN.top - MARGIN.bottom;
  const x = (step) => MARGIN.left + ((step - x0) / (x1 - x0)) * plotW;
  const y = (value) => MARGIN.top + (1 - (value - y0) / (y1 - y0)) * plotH;

  const axes = svg("g", { class: "axes" });
  for (const value of ticks(y0, y1)) {
    axes.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(value), y2: y(value), class: "grid" }));
    axes.append(svg("text", { x: MARGIN.left - 6, y: y(value) + 4, "text-anchor": "end" }, label(value)));
  }
  for (const value of ticks(x0, x1, 6)) {
    axes.append(svg("text", { x: x(value), y: height - MARGIN.bottom + 16, "text-anchor": "middle" }, label(value)));
  }
  axes.append(svg("text", { x: MARGIN.left + plotW / 2, y: height - 4, "text-anchor": "middle", class: "axis-label" },
    xLabel));
  axes.append(svg("rect", { x: MARGIN.left, y: MARGIN.top, width: plotW, height: plotH, class: "frame" }));
  root.append(axes);

  drawn.forEach((s, index) => {
    const points = [...s.points].sort((a, b) => a.step - b.step);
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p.value).toFixed(1)}`).join("");
    const group = svg("g", { class: `series series-${index} ${s.className ?? ""}` });
    group.append(svg("path", { d, "data-series": s.name, "data-points": points.length }));
    if (points.length <= 40) {
      for (const p of points) {
        const dot = svg("circle", { cx: x(p.step).toFixed(1), cy: y(p.value).toFixed(1), r: 2.5 });
        dot.append(svg("title", {}, `${s.name} @ ${p.step}: ${label(p.value)}`));
        group.append(dot);
      }
    }
    group.append(svg("text", { x: MARGIN.left + 8 + index * 150, y: MARGIN.top + 14, class: "legend" },
      `— ${s.name}`));
    root.append(group);
  });
  return root;
}
