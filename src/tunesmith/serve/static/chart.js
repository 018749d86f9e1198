// A line chart on a canvas: a few series of (x, y) points, axes with their ranges, a legend.

const COLORS = ["#2f6fdf", "#d9480f", "#2b8a3e", "#862e9c", "#e67700"];

export function drawChart(canvas, series, xLabel = "step") {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 48, right: 12, top: 22, bottom: 28 };
  context.clearRect(0, 0, width, height);
  const points = series.flatMap((s) => s.points);
  context.font = "11px sans-serif";
  context.fillStyle = "#5c6478";
  if (!points.length) {
    context.fillText("waiting for the first logged step ...", pad.left, height / 2);
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  context.strokeStyle = "#d8dce4";
  context.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);
  context.fillText(y1.toFixed(3), 4, pad.top + 4);
  context.fillText(y0.toFixed(3), 4, height - pad.bottom);
  context.fillText(`${xLabel} ${x0}`, pad.left, height - 8);
  context.fillText(String(x1), width - pad.right - 24, height - 8);
  series.forEach((s, index) => {
    const color = COLORS[index % COLORS.length];
    context.strokeStyle = color;
    context.fillStyle = color;
    context.lineWidth = 1.6;
    context.beginPath();
    s.points.forEach(([x, y], i) => (i ? context.lineTo(X(x), Y(y)) : context.moveTo(X(x), Y(y))));
    context.stroke();
    if (s.points.length === 1) context.fillRect(X(s.points[0][0]) - 2, Y(s.points[0][1]) - 2, 4, 4);
    context.fillText(s.name, pad.left + 8 + index * 150, 14);
  });
}
