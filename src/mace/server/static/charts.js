// A small time-series line chart on <canvas>: the last `windowS` seconds of a few series, with
// vertical markers for events (adapter publishes). Hand-written so the dashboard needs no library.

const AXIS = "#8a93a5";
const GRID = "#e6e9ef";
const FONT = "11px system-ui, sans-serif";

export class TimeChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{series: {key: string, label: string, color: string}[], format: (v: number) => string,
   *          yMax?: number, stepped?: boolean, integer?: boolean}} options yMax fixes the top of the axis
   *   (e.g. 1 for shares); integer keeps the gridlines on whole numbers (counts, versions)
   */
  constructor(canvas, options) {
    this.canvas = canvas;
    this.options = options;
    this.points = options.series.map(() => []); // per series: [t, value | null]
  }

  /** Add the values (by series key) observed at server time `t` (seconds); null leaves a gap. */
  push(t, values) {
    this.options.series.forEach((series, i) => {
      const value = values[series.key];
      this.points[i].push([t, Number.isFinite(value) ? value : null]);
    });
  }

  draw(now, windowS, events = []) {
    const from = now - windowS;
    for (const points of this.points) {
      while (points.length > 2 && points[1][0] < from) points.shift();
    }
    this.canvas.dataset.points = String(this.points[0]?.length ?? 0);
    const ctx = this._context();
    const { width, height } = this.canvas.getBoundingClientRect();
    const plot = { left: 58, right: width - 8, top: 18, bottom: height - 18 };
    ctx.clearRect(0, 0, width, height);
    const yMax = this._yMax(from);
    const x = (t) => plot.left + ((t - from) / windowS) * (plot.right - plot.left);
    const y = (v) => plot.bottom - (v / yMax) * (plot.bottom - plot.top);
    this._grid(ctx, plot, yMax, y, windowS);
    this._events(ctx, plot, events.filter((e) => e.t >= from && e.t <= now), x);
    this.options.series.forEach((series, i) => this._line(ctx, this.points[i], series.color, x, y, plot, now));
    this._legend(ctx, plot);
  }

  _context() {
    const ratio = window.devicePixelRatio || 1;
    const { width, height } = this.canvas.getBoundingClientRect();
    if (this.canvas.width !== Math.round(width * ratio) || this.canvas.height !== Math.round(height * ratio)) {
      this.canvas.width = Math.round(width * ratio);
      this.canvas.height = Math.round(height * ratio);
    }
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return ctx;
  }

  _yMax(from) {
    if (this.options.yMax !== undefined) return this.options.yMax;
    let top = 0;
    for (const points of this.points) {
      for (const [t, v] of points) if (t >= from && v !== null) top = Math.max(top, v);
    }
    // Four gridlines: counts need a top that divides by four to land them on whole numbers.
    return this.options.integer ? Math.max(4, Math.ceil(top / 4) * 4) : niceCeiling(top);
  }

  _grid(ctx, plot, yMax, y, windowS) {
    ctx.font = FONT;
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const value = (yMax * i) / 4;
      const py = Math.round(y(value)) + 0.5;
      ctx.strokeStyle = GRID;
      ctx.beginPath();
      ctx.moveTo(plot.left, py);
      ctx.lineTo(plot.right, py);
      ctx.stroke();
      ctx.fillStyle = AXIS;
      ctx.textAlign = "right";
      ctx.fillText(this.options.format(value), plot.left - 6, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const ago of [windowS, windowS / 2, 0]) {
      const px = plot.right - (ago / windowS) * (plot.right - plot.left);
      ctx.fillText(ago === 0 ? "now" : `-${Math.round(ago)}s`, Math.min(Math.max(px, plot.left + 12), plot.right - 12),
        plot.bottom + 4);
    }
  }

  _events(ctx, plot, events, x) {
    ctx.save();
    ctx.setLineDash([4, 3]);
    ctx.strokeStyle = "#b07cd8";
    ctx.fillStyle = "#7a3fb0";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    for (const event of events) {
      const px = Math.round(x(event.t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(px, plot.top);
      ctx.lineTo(px, plot.bottom);
      ctx.stroke();
      const width = ctx.measureText(event.label).width;
      ctx.fillText(event.label, px + 3 + width > plot.right ? px - 3 - width : px + 3, plot.top);
    }
    ctx.restore();
  }

  _line(ctx, points, color, x, y, plot, now) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.8;
    ctx.beginPath();
    let drawing = false;
    let last = null;
    for (const [t, v] of points) {
      if (v === null) {
        drawing = false;
        continue;
      }
      const px = Math.max(x(t), plot.left);
      if (!drawing) ctx.moveTo(px, y(v));
      else if (this.options.stepped) ctx.lineTo(px, y(last));
      ctx.lineTo(px, y(v));
      drawing = true;
      last = v;
    }
    if (drawing && this.options.stepped) ctx.lineTo(x(now), y(last));
    ctx.stroke();
  }

  _legend(ctx, plot) {
    ctx.font = FONT;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    let px = plot.left;
    for (const series of this.options.series) {
      ctx.fillStyle = series.color;
      ctx.fillRect(px, 4, 10, 8);
      ctx.fillStyle = AXIS;
      ctx.fillText(series.label, px + 14, 8);
      px += 22 + ctx.measureText(series.label).width;
    }
  }
}

/** 1, 2 or 5 times a power of ten, at least `value` (and above zero, so an idle chart has an axis). */
export function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}
