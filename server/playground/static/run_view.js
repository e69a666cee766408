// One run's pane: the progress events and tokens as they stream, then the answer, its
// alignment summary, the strategy's trace view and the call timeline.
//
// The pane's data-state is idle, running, done or error (tests and scripts wait on it).

import { fmt, h, jsonDetails } from "./dom.js";
import { ganttChart } from "./gantt.js";
import { traceView } from "./traces.js";

function progressLine(progress) {
  return Object.entries(progress)
    .map(([key, value]) => `${key}=${typeof value === "number" ? fmt(value) : JSON.stringify(value)}`)
    .join(" ");
}

export class RunView {
  constructor(element) {
    this.element = element;
    this.reset("");
  }

  /** Empty the pane for a new run of `title`. */
  reset(title) {
    this.texts = {};
    this.tokens = {};
    this.alignment = null;
    this.usage = null;
    this.finish = {};
    this.progressCount = 0;
    this.contentChunks = 0;
    this.element.dataset.state = "idle";
    this.element.dataset.chunks = "0";
    this.status = h("div", { class: "status" });
    this.progress = h("ol", { class: "progress" });
    this.streams = h("div", { class: "streams" });
    this.details = h("div", { class: "details" });
    this.element.replaceChildren(
      h("h3", {}, title),
      this.status,
      h("details", { class: "progress-box", open: true }, h("summary", {}, "Progress"), this.progress),
      this.streams,
      this.details,
    );
  }

  start(title) {
    this.reset(title);
    this.element.dataset.state = "running";
    this.status.textContent = "Running…";
  }

  #stream(index) {
    let block = this.streams.querySelector(`[data-index="${index}"]`);
    if (!block) {
      block = h("div", { class: "stream text", dataset: { index } });
      this.streams.append(h("div", { class: "choice-label" }, `choice ${index}`), block);
    }
    return block;
  }

  /** Take one streamed chunk. */
  chunk(chunk) {
    if (chunk.alignment_progress) {
      this.progressCount++;
      this.progress.append(h("li", {}, progressLine(chunk.alignment_progress)));
      this.status.textContent = `Running… ${this.progressCount} progress events`;
    }
    for (const choice of chunk.choices || []) {
      const content = choice.delta?.content;
      if (content) {
        this.element.dataset.chunks = String(++this.contentChunks);
        this.texts[choice.index] = (this.texts[choice.index] || "") + content;
        // The logprobs' tokens, when sent, are the exact tokens; else one delta per piece.
        const logprobTokens = choice.logprobs?.content?.map((t) => t.token);
        (this.tokens[choice.index] ??= []).push(...(logprobTokens?.length ? logprobTokens : [content]));
        this.#stream(choice.index).textContent = this.texts[choice.index];
      }
      if (choice.finish_reason) this.finish[choice.index] = choice.finish_reason;
    }
    if (chunk.alignment) this.alignment = chunk.alignment;
    if (chunk.usage) this.usage = chunk.usage;
  }

  /** The run ended with [DONE]: draw the answer's alignment, trace and timeline. */
  done() {
    const alignment = this.alignment || {};
    this.element.dataset.state = "done";
    this.status.textContent = `Done: ${Object.keys(this.texts).length} choice(s)` +
      `${Object.values(this.finish).length ? `, finish ${Object.values(this.finish).join(", ")}` : ""}`;
    const tokens = alignment.engine_tokens || {};
    this.details.replaceChildren(
      h("h4", {}, "Alignment"),
      h("dl", { class: "summary" },
        h("dt", {}, "strategy"), h("dd", {}, alignment.strategy ?? "–"),
        h("dt", {}, "rewards"), h("dd", { class: "rewards" }, (alignment.rewards || []).map((r) => fmt(r)).join(", ") || "–"),
        h("dt", {}, "engine tokens"), h("dd", { class: "engine-tokens" },
          `${tokens.total_tokens ?? "–"} (${tokens.prompt_tokens ?? "–"} prompt + ${tokens.completion_tokens ?? "–"} generated)`),
        h("dt", {}, "elapsed"), h("dd", { class: "elapsed" }, `${fmt(alignment.elapsed_seconds)} s`),
        h("dt", {}, "engine calls"), h("dd", {}, alignment.engine_calls ?? "–"),
        h("dt", {}, "candidates"), h("dd", {}, `${alignment.candidates_generated ?? "–"} generated, ${alignment.candidates_scored ?? "–"} scored`),
      ),
      h("h4", {}, "Trace"),
      traceView(alignment.strategy, alignment.trace, { tokens: this.tokens, texts: this.texts }),
      h("h4", {}, "Call timeline"),
      alignment.trace?.timeline?.length
        ? h("div", { class: "gantt-box" }, ganttChart(alignment.trace.timeline),
          h("p", { class: "muted" }, "Engine and reward calls; the critical path is outlined in red."))
        : h("p", { class: "muted no-timeline" }, "This strategy made no timed calls to show."),
      jsonDetails("alignment JSON", alignment),
    );
  }

  /** The run failed: show the server's message. */
  fail(error) {
    this.element.dataset.state = "error";
    const where = error.param ? ` (${error.param})` : "";
    const status = error.status ? `${error.status}: ` : "";
    this.status.replaceChildren(h("div", { class: "error", role: "alert" }, `${status}${error.message}${where}`));
  }
}
