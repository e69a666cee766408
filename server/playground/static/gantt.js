// The call timeline (alignment.trace.timeline) as a Gantt chart, with its critical path.
//
// Timeline entries, as the server exports them (engine/timeline.py):
//   {kind: "engine", start, end, n, max_tokens, prompt_tokens, completion_tokens, aborted, ...}
//   {kind: "reward", start, end, reward, candidates, partial}
// start/end are seconds since the request began; end is null for a call that never ended.

import { fmt, s } from "./dom.js";

/** Seconds: an end this close after a start still counts as before it (offsets are rounded,
 * and a strategy notes an end just before its next start). Same as benchmarks/critical_path.py. */
export const TOLERANCE = 1e-3;

/**
 * The critical path: the indices, first to last, of the chain of calls that bounded the
 * request's time.
 *
 * A call is taken to have waited for every call that started before it and ended before it
 * started (within TOLERANCE): the timeline does not record real dependencies, and this
 * reading never misses one (it may add some between calls that only happened in turn).
 * Over that graph, longest[j] = duration(j) + max(longest[i] for the calls i that j waited
 * for): the longest chain of call durations ending at j, computed in start order so that
 * every predecessor is done first. The path is that chain for the call that ended last (the
 * end of the request's work), read back through the predecessor that gave each maximum.
 * Gaps between calls are the strategy's own work and are not counted. O(n²) in calls.
 */
export function criticalPath(timeline) {
  const calls = timeline.map((call, index) => ({ ...call, index }));
  const ended = calls.filter((call) => call.end !== null && call.end !== undefined);
  if (!ended.length) return [];
  const order = [...calls].sort((a, b) => a.start - b.start || a.index - b.index);
  const longest = new Map();
  const previous = new Map();
  order.forEach((call, rank) => {
    let best = 0;
    let via = null;
    for (const earlier of order.slice(0, rank)) {
      const waited = earlier.end !== null && earlier.end !== undefined &&
        earlier.end <= call.start + TOLERANCE;
      if (waited && longest.get(earlier.index) > best) {
        best = longest.get(earlier.index);
        via = earlier.index;
      }
    }
    longest.set(call.index, best + duration(call));
    previous.set(call.index, via);
  });
  let last = ended.reduce((a, b) => (b.end > a.end ? b : a)).index;
  const path = [];
  while (last !== null) {
    path.push(last);
    last = previous.get(last);
  }
  return path.reverse();
}

export function duration(call) {
  return call.end === null || call.end === undefined ? 0 : Math.max(0, call.end - call.start);
}

/** Pack calls of one kind into lanes: each goes in the first lane free at its start. */
function lanes(calls) {
  const laneEnds = [];
  const lane = new Map();
  for (const call of [...calls].sort((a, b) => a.start - b.start)) {
    const end = call.end ?? call.start;
    let free = laneEnds.findIndex((laneEnd) => laneEnd <= call.start + 1e-9);
    if (free === -1) free = laneEnds.push(end) - 1;
    else laneEnds[free] = end;
    lane.set(call.index, free);
  }
  return { lane, count: laneEnds.length };
}

function label(call) {
  const time = `${fmt((call.start) * 1000, 1)}–${fmt((call.end ?? call.start) * 1000, 1)} ms`;
  if (call.kind === "reward") {
    return `reward ${call.reward ?? ""}: ${call.candidates ?? "?"} candidates` +
      `${call.partial ? " (partial)" : ""}, ${time}`;
  }
  return `engine: n=${call.n ?? "?"}, ${call.prompt_tokens ?? "?"} prompt + ` +
    `${call.completion_tokens ?? "?"} generated tokens${call.aborted ? ", aborted" : ""}, ${time}`;
}

function ticks(total, count = 6) {
  if (total <= 0) return [0];
  const raw = total / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((m) => m >= raw);
  const values = [];
  for (let t = 0; t <= total + 1e-12; t += step) values.push(t);
  return values;
}

/**
 * An SVG Gantt chart of `timeline`: one bar (rect.bar) per call, engine lanes above reward
 * lanes, critical-path bars marked (class "critical") and joined by a line.
 */
export function ganttChart(timeline, { width = 760 } = {}) {
  const calls = timeline.map((call, index) => ({ ...call, index }));
  const critical = new Set(criticalPath(timeline));
  const total = Math.max(1e-6, ...calls.map((c) => c.end ?? c.start));
  const kinds = ["engine", "reward", ...new Set(calls.map((c) => c.kind))]
    .filter((kind, i, all) => all.indexOf(kind) === i && calls.some((c) => c.kind === kind));
  const rowHeight = 14;
  const gap = 4;
  const left = 64;
  const plot = width - left - 10;
  const x = (t) => left + (t / total) * plot;
  const rows = [];
  let y = 6;
  const bars = s("g", { class: "bars" });
  const centres = new Map();
  for (const kind of kinds) {
    const group = calls.filter((c) => c.kind === kind);
    const { lane, count } = lanes(group);
    rows.push(s("text", { x: 4, y: y + rowHeight - 3, class: "lane-label" }, kind));
    for (const call of group) {
      const top = y + lane.get(call.index) * (rowHeight + gap);
      const end = call.end ?? total;
      const bar = s("rect", {
        class: `bar ${kind}${critical.has(call.index) ? " critical" : ""}` +
          `${call.end === null || call.end === undefined ? " open" : ""}` +
          `${call.aborted ? " aborted" : ""}`,
        x: x(call.start),
        y: top,
        width: Math.max(1.5, x(end) - x(call.start)),
        height: rowHeight,
        "data-index": call.index,
        "data-kind": kind,
      }, s("title", {}, label(call)));
      bars.append(bar);
      centres.set(call.index, { x0: x(call.start), x1: x(end), y: top + rowHeight / 2 });
    }
    y += count * (rowHeight + gap) + 8;
    rows.push(s("line", { x1: left, x2: width - 10, y1: y - 6, y2: y - 6, class: "lane-rule" }));
  }
  const path = [...critical].sort((a, b) => calls[a].start - calls[b].start);
  const points = path.flatMap((i) => {
    const c = centres.get(i);
    return [`${c.x0},${c.y}`, `${c.x1},${c.y}`];
  });
  const axisY = y + 4;
  const axis = s("g", { class: "axis" },
    ticks(total).map((t) => [
      s("line", { x1: x(t), x2: x(t), y1: 2, y2: axisY, class: "tick" }),
      s("text", { x: x(t), y: axisY + 12, "text-anchor": "middle" },
        total < 1 ? `${fmt(t * 1000, 1)} ms` : `${fmt(t, 2)} s`),
    ]));
  const svg = s("svg", {
    class: "gantt",
    viewBox: `0 0 ${width} ${axisY + 18}`,
    width,
    height: axisY + 18,
    role: "img",
    "aria-label": `call timeline: ${calls.length} calls, ${critical.size} on the critical path`,
  }, axis, rows, bars,
  points.length ? s("polyline", { points: points.join(" "), class: "critical-line" }) : null);
  return svg;
}
