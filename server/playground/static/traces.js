// One view per strategy of alignment.trace, plus a fallback for strategies it does not know.
// The shapes assumed below are those the strategies build (strategies/*.py) with
// return_trace; every view tolerates missing fields, since traces may grow.

import { fmt, h, jsonDetails, s } from "./dom.js";

function finiteRewards(values) {
  return values.filter((v) => typeof v === "number" && Number.isFinite(v));
}

/** A strip of every reward as a tick, with `mine` (if given) highlighted. */
function rewardStrip(rewards, mine, { width = 120, height = 14 } = {}) {
  const values = finiteRewards(rewards);
  const low = Math.min(...values);
  const high = Math.max(...values);
  const x = (v) => 3 + (high === low ? 0.5 : (v - low) / (high - low)) * (width - 6);
  return s("svg", { class: "strip", width, height, viewBox: `0 0 ${width} ${height}` },
    s("line", { x1: 0, x2: width, y1: height / 2, y2: height / 2, class: "strip-axis" }),
    values.map((v) => s("line", { x1: x(v), x2: x(v), y1: 3, y2: height - 3, class: "strip-tick" })),
    typeof mine === "number" && Number.isFinite(mine)
      ? s("circle", { cx: x(mine), cy: height / 2, r: 4, class: "strip-mine" }) : null);
}

/** A histogram of rewards in `bins` equal bins. */
function histogram(rewards, { bins = 10, width = 320, height = 70 } = {}) {
  const values = finiteRewards(rewards);
  if (!values.length) return h("p", { class: "muted" }, "No rewards.");
  const low = Math.min(...values);
  const high = Math.max(...values);
  const span = high - low || 1;
  const counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor(((v - low) / span) * bins))]++;
  const most = Math.max(...counts);
  const barWidth = (width - 20) / bins;
  return h("figure", { class: "histogram" },
    s("svg", { width, height: height + 16, viewBox: `0 0 ${width} ${height + 16}` },
      counts.map((count, i) => s("rect", {
        class: "hist-bar",
        x: 10 + i * barWidth + 1,
        y: height - (count / most) * (height - 4),
        width: barWidth - 2,
        height: (count / most) * (height - 4),
      }, s("title", {}, `${count} in [${fmt(low + (i * span) / bins)}, ${fmt(low + ((i + 1) * span) / bins)})`))),
      s("text", { x: 10, y: height + 13, class: "axis-label" }, fmt(low)),
      s("text", { x: width - 10, y: height + 13, "text-anchor": "end", class: "axis-label" }, fmt(high))),
    h("figcaption", {}, `${values.length} candidate rewards`));
}

// best_of_n: {reward, rewards: [per candidate], chosen: [indices], candidates?: [{text,
// reward, finish_reason, tokens}]} (candidates only with return_trace).
function bestOfN(trace) {
  const candidates = (trace.candidates || trace.rewards.map((reward) => ({ reward })))
    .map((candidate, index) => ({ ...candidate, index }));
  const rewards = candidates.map((c) => c.reward);
  const chosen = new Set(trace.chosen || []);
  const ranked = [...candidates].sort((a, b) => (b.reward ?? -Infinity) - (a.reward ?? -Infinity));
  return h("div", {},
    h("p", {}, `Reward: ${trace.reward ?? "?"} · ${candidates.length} candidates, ranked by reward.`),
    histogram(rewards),
    h("table", { class: "candidates" },
      h("thead", {}, h("tr", {}, ["#", "sample", "reward", "distribution", "tokens", "finish", "text"]
        .map((title) => h("th", {}, title)))),
      h("tbody", {}, ranked.map((c, rank) => h("tr", { class: chosen.has(c.index) ? "chosen" : "" },
        h("td", {}, rank + 1),
        h("td", {}, c.index),
        h("td", { class: "num" }, fmt(c.reward)),
        h("td", {}, rewardStrip(rewards, c.reward)),
        h("td", { class: "num" }, c.tokens ?? "–"),
        h("td", {}, c.finish_reason ?? "–"),
        h("td", { class: "text" }, c.text ?? "")))))); 
}

// tpo: {mode, depth, width, initial: {candidates: [{text, score, finish_reason, round}],
// dropped}, rounds: [{round, completed, chosen, rejected, loss, gradient, fallbacks,
// candidates (the regenerations), dropped: [{text, reason}]}]}.
function response(title, item, cls) {
  if (!item) return null;
  return h("div", { class: `response ${cls}` },
    h("div", { class: "response-head" }, `${title} · score ${fmt(item.score)}` +
      (item.round !== undefined ? ` · from round ${item.round}` : "")),
    h("div", { class: "text" }, item.text));
}

function scoredList(items) {
  return h("ol", { class: "scored" }, items.map((item) =>
    h("li", {}, h("span", { class: "score" }, fmt(item.score)), " ", item.text)));
}

function tpo(trace) {
  const rounds = trace.rounds || [];
  const best = [Math.max(...finiteRewards((trace.initial?.candidates || []).map((c) => c.score)))];
  for (const round of rounds) {
    best.push(Math.max(best[best.length - 1], ...finiteRewards((round.candidates || []).map((c) => c.score))));
  }
  return h("div", { class: "tpo" },
    h("p", {}, `Mode ${trace.mode ?? "tpo"} · depth ${trace.depth} · width ${trace.width} · ` +
      `best score by round: ${best.map((b) => fmt(b)).join(" → ")}`),
    h("section", { class: "round" }, h("h4", {}, "Round 0: initial samples"),
      scoredList(trace.initial?.candidates || [])),
    rounds.map((round) => h("section", { class: "round", dataset: { round: round.round } },
      h("h4", {}, `Round ${round.round}${round.completed === false ? " (cut short)" : ""}`),
      h("div", { class: "pair" }, response("chosen", round.chosen, "chosen"),
        response("rejected", round.rejected, "rejected")),
      round.loss !== undefined ? h("div", { class: "feedback" }, h("h5", {}, "Textual loss"),
        h("div", { class: "text" }, round.loss)) : null,
      round.gradient !== undefined ? h("div", { class: "feedback" }, h("h5", {}, "Textual gradient"),
        h("div", { class: "text" }, round.gradient)) : null,
      round.fallbacks?.length ? h("p", { class: "muted" }, `fallbacks: ${round.fallbacks.join(", ")}`) : null,
      h("h5", {}, "Regenerations"),
      (round.candidates || []).length ? scoredList(round.candidates) : h("p", { class: "muted" }, "none new"),
      (round.dropped || []).length ? h("p", { class: "muted" },
        `dropped: ${round.dropped.map((d) => d.reason).join(", ")}`) : null)));
}

// rain: {searches: [one per choice: {iterations, rounds, rewinds, expansions, simulations,
// widenings, commits: [{committed, committed_tokens, iterations, rewinds, candidates:
// [{text, tokens, prior, visits, real_visits, value}]}]}]}. Each commit is the search tree
// under the reply so far: its root's children (the candidate segments) with their visits
// and values; the committed child is the one whose text equals `committed`.
function rainTree(commit, prefix) {
  const children = commit.candidates || [];
  const rowHeight = 26;
  const width = 700;
  const height = Math.max(1, children.length) * rowHeight + 10;
  const mostVisits = Math.max(1, ...children.map((c) => c.visits ?? 0));
  const rootY = height / 2;
  return s("svg", { class: "rain-tree", width, height, viewBox: `0 0 ${width} ${height}` },
    s("circle", { cx: 12, cy: rootY, r: 6, class: "node root" }, s("title", {}, prefix || "(start)")),
    children.map((child, i) => {
      const y = 5 + i * rowHeight + rowHeight / 2;
      const committed = child.text === commit.committed;
      const value = child.value ?? 0;
      return s("g", { class: `child${committed ? " committed" : ""}` },
        s("line", { x1: 18, y1: rootY, x2: 180, y2: y, class: "edge",
          "stroke-width": 1 + 5 * ((child.visits ?? 0) / mostVisits) }),
        s("circle", { cx: 186, cy: y, r: 6, class: `node ${value > 0 ? "good" : value < 0 ? "bad" : "even"}` }),
        s("text", { x: 198, y: y + 4, class: "node-label" },
          `N=${fmt(child.visits, 2)} v=${fmt(value, 2)} p=${fmt(child.prior, 2)}  ${JSON.stringify(child.text)}`),
        s("title", {}, `visits ${child.visits} (real ${child.real_visits}), value ${child.value}, ` +
          `prior ${child.prior}, ${child.tokens} tokens`));
    }));
}

function rain(trace) {
  return h("div", { class: "rain" }, (trace.searches || []).map((search, choice) => {
    let prefix = "";
    const segments = [];
    const commits = (search.commits || []).map((commit, i) => {
      const view = h("section", { class: "commit" },
        h("h5", {}, `Commit ${i + 1}: ${JSON.stringify(commit.committed)} · ${commit.iterations} ` +
          `iterations · ${commit.rewinds} rewinds`),
        h("div", { class: "muted prefix" }, `after: ${prefix ? JSON.stringify(prefix.length > 60 ? `…${prefix.slice(-60)}` : prefix) : "(the start of the reply)"}`),
        rainTree(commit, prefix));
      prefix += commit.committed;
      segments.push(h("span", { class: `segment seg-${i % 2}`, title: `commit ${i + 1}` }, commit.committed));
      return view;
    });
    return h("div", { class: "search" },
      h("p", {}, `Choice ${choice}: ${search.iterations} iterations, ${search.rounds} rounds, ` +
        `${search.rewinds} rewinds, ${search.expansions ?? "?"} expansions, ` +
        `${search.simulations ?? "?"} simulations, ${search.widenings ?? 0} widenings`),
      h("div", { class: "text segments" }, segments),
      commits);
  }));
}

// darwin: {mode, cycles, original_instruction, seed: {text, score}, archive: [{cycle,
// archive: [{instruction, reward}]}], cycle_records: [{cycle, completed, drawn, mutation:
// {text, variants, fallbacks}, steps: [{step, beams: [{beam, instruction, tokens, finished,
// score?}], kept?: [beam], replacements?: [{beam, from}]}], final: [{beam, instruction,
// times_kept, text, score}], promoted, entered}]}. A beam's `instruction` indexes the
// cycle's variants.
function archiveTable(archive) {
  const instructions = [];
  for (const snapshot of archive) {
    for (const entry of snapshot.archive) {
      if (!instructions.includes(entry.instruction)) instructions.push(entry.instruction);
    }
  }
  return h("table", { class: "archive" },
    h("thead", {}, h("tr", {}, h("th", {}, "instruction"),
      archive.map((snapshot) => h("th", {}, `cycle ${snapshot.cycle}`)))),
    h("tbody", {}, instructions.map((instruction) => h("tr", {}, h("td", { class: "text" }, instruction),
      archive.map((snapshot) => {
        const entry = snapshot.archive.find((e) => e.instruction === instruction);
        return h("td", { class: entry ? "num in" : "num" }, entry ? fmt(entry.reward) : "");
      })))));
}

function stepsGrid(record) {
  const steps = record.steps || [];
  const beams = Math.max(0, ...steps.map((step) => (step.beams || []).length));
  return h("table", { class: "steps" },
    h("thead", {}, h("tr", {}, h("th", {}, "beam"), steps.map((step) => h("th", {}, `step ${step.step}`)),
      h("th", {}, "final"))),
    h("tbody", {}, Array.from({ length: beams }, (_, b) => h("tr", {},
      h("th", {}, `${b}`),
      steps.map((step) => {
        const beam = (step.beams || [])[b] || {};
        const kept = (step.kept || []).includes(b);
        const replaced = (step.replacements || []).find((r) => r.beam === b);
        const cls = ["beam", kept ? "kept" : "", replaced ? "replaced" : "", beam.finished ? "finished" : ""];
        return h("td", { class: cls.join(" ").trim(), title: `instruction ${beam.instruction}, ${beam.tokens} tokens` },
          beam.score !== undefined ? fmt(beam.score) : `${beam.tokens ?? ""}t`,
          kept ? h("span", { class: "mark" }, " ✓") : null,
          replaced ? h("span", { class: "mark" }, ` ← ${replaced.from}`) : null);
      }),
      h("td", { class: "num" }, fmt((record.final || []).find((f) => f.beam === b)?.score))))));
}

function darwin(trace) {
  return h("div", { class: "darwin" },
    h("p", {}, `Mode ${trace.mode} · ${trace.cycles} cycles · seed score ${fmt(trace.seed?.score)}`),
    h("h4", {}, "Archive over time"), archiveTable(trace.archive || []),
    (trace.cycle_records || []).map((record) => h("section", { class: "cycle" },
      h("h4", {}, `Cycle ${record.cycle}${record.completed === false ? " (cut short)" : ""}`),
      h("p", {}, h("b", {}, "Drawn: "), record.drawn),
      h("h5", {}, "Mutations"),
      h("ol", { class: "variants", start: 0 }, (record.mutation?.variants || []).map((v) => h("li", {}, v))),
      record.mutation?.fallbacks?.length
        ? h("p", { class: "muted" }, `fallbacks: ${record.mutation.fallbacks.join(", ")}`) : null,
      h("h5", {}, "Beams (✓ kept, ← replaced by that beam's reply)"),
      stepsGrid(record),
      record.promoted?.length ? h("p", {}, `Promoted: ${record.promoted.map((p) => `beam ${p.beam} (${fmt(p.score)})`).join(", ")}`) : null,
      h("p", {}, `Entered the archive: ${(record.entered || []).length}`))));
}

// adaptive_temperature: {temperature_level, temperature_mode, temperature_head,
// temperature_mean, temperature_histogram, temperatures, choices: [{index,
// token_temperatures}]}. The trace has no token texts: `tokens[index]` holds the pieces the
// stream delivered (one per token when it streamed token by token, or the logprobs' tokens
// when the request asked for logprobs). When the counts differ the colours are spread over
// the text proportionally, and the view says so.
export function temperatureColour(t, low, high) {
  const f = high > low ? (t - low) / (high - low) : 0.5;
  const hue = 220 - 220 * Math.min(1, Math.max(0, f)); // blue (cool) to red (hot)
  return `hsl(${hue} 75% 80%)`;
}

function adaptiveTemperature(trace, context) {
  const set = trace.temperatures || [];
  const all = (trace.choices || []).flatMap((c) => c.token_temperatures || []);
  const low = Math.min(...set, ...all);
  const high = Math.max(...set, ...all);
  const legend = h("div", { class: "legend" }, "temperature: ",
    [...new Set([...set].sort((a, b) => a - b))].map((t) => {
      const swatch = h("span", { class: "swatch" }, fmt(t, 2));
      swatch.style.backgroundColor = temperatureColour(t, low, high);
      return swatch;
    }));
  return h("div", { class: "adaptive" },
    h("p", {}, `Level ${trace.temperature_level} · mode ${trace.temperature_mode} · head ` +
      `${trace.temperature_head ?? "–"} · mean ${fmt(trace.temperature_mean)}`),
    legend,
    (trace.choices || []).map((choice) => {
      const temps = choice.token_temperatures || [];
      const pieces = context.tokens?.[choice.index] || [];
      const text = context.texts?.[choice.index] ?? pieces.join("");
      let spans;
      let note = null;
      if (pieces.length === temps.length && temps.length) {
        spans = pieces.map((piece, i) => [piece, temps[i]]);
      } else {
        note = `the stream gave ${pieces.length} pieces for ${temps.length} tokens: colours are spread over the text`;
        const size = Math.ceil(text.length / Math.max(1, temps.length));
        spans = temps.map((t, i) => [text.slice(i * size, (i + 1) * size), t]);
      }
      return h("div", { class: "choice" },
        h("div", { class: "text tokens" }, spans.map(([piece, t]) => {
          const span = h("span", { class: "token", title: `temperature ${t}` }, piece);
          span.style.backgroundColor = temperatureColour(t, low, high);
          return span;
        })),
        note ? h("p", { class: "muted" }, note) : null);
    }));
}

const VIEWS = {
  best_of_n: bestOfN,
  tpo,
  rain,
  darwin,
  adaptive_temperature: adaptiveTemperature,
};

/**
 * The view of `trace` for `strategy`. `context` carries what the trace itself lacks: the
 * streamed token pieces and texts per choice index.
 */
export function traceView(strategy, trace, context = {}) {
  const { timeline, ...rest } = trace || {};
  const view = VIEWS[strategy];
  const body = !trace ? h("p", { class: "muted" }, "No trace.")
    : view ? view(rest, context)
      : h("p", { class: "muted" }, `No dedicated view for ${strategy}.`);
  return h("div", { class: "trace-view", dataset: { strategy } }, body,
    trace ? jsonDetails("trace JSON", rest) : null);
}
