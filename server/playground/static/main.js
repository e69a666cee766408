// The playground page: loads the lists from the API, builds the forms, runs requests.

import { ApiClient } from "./api.js";
import { fmt, h } from "./dom.js";
import { MessageEditor, requestFields } from "./request_form.js";
import { RunView } from "./run_view.js";
import { configForm } from "./schema_form.js";

const $ = (id) => document.getElementById(id);

/** Ask for the API key in the page's dialog; resolves to the key, or null if cancelled. */
function askKey(message) {
  const dialog = $("key-dialog");
  const input = $("key-input");
  $("key-message").textContent = message;
  input.value = "";
  return new Promise((resolve) => {
    const finish = (value) => {
      $("key-ok").removeEventListener("click", ok);
      $("key-cancel").removeEventListener("click", cancel);
      input.removeEventListener("keydown", enter);
      dialog.removeEventListener("cancel", cancel);
      dialog.close();
      resolve(value);
    };
    const ok = () => finish(input.value.trim() || null);
    const cancel = (event) => {
      event?.preventDefault?.();
      finish(null);
    };
    const enter = (event) => {
      if (event.key === "Enter") ok();
    };
    $("key-ok").addEventListener("click", ok);
    $("key-cancel").addEventListener("click", cancel);
    input.addEventListener("keydown", enter);
    dialog.addEventListener("cancel", cancel);
    dialog.showModal();
    input.focus();
  });
}

const api = new ApiClient(new URL("v1/", window.location.href), askKey);

/** A strategy picker with one generated config form per strategy (only one shown). */
class StrategyPanel {
  constructor(side, strategies, initial) {
    this.select = $(`strategy-${side}`);
    this.description = $(`description-${side}`);
    this.container = $(`config-${side}`);
    this.strategies = new Map(strategies.map((s) => [s.name, s]));
    this.forms = new Map();
    for (const strategy of strategies) {
      this.select.append(h("option", { value: strategy.name }, strategy.name));
      const form = configForm(strategy.config_schema || {}, `cfg-${side}-${strategy.name}`);
      const wrapper = h("div", { class: "config-form", dataset: { strategy: strategy.name } }, form.element);
      this.container.append(wrapper);
      this.forms.set(strategy.name, { wrapper, collect: form.collect });
    }
    this.select.value = this.strategies.has(initial) ? initial : strategies[0]?.name;
    this.select.addEventListener("change", () => this.show());
    this.show();
  }

  show() {
    const chosen = this.strategies.get(this.select.value);
    for (const [name, form] of this.forms) form.wrapper.hidden = name !== this.select.value;
    this.description.textContent = chosen
      ? `${chosen.description}${chosen.uses_reward ? " (uses a reward)" : ""}` : "";
  }

  /** {strategy, strategy_config?}: the config holds only fields changed from the defaults. */
  body() {
    const strategy = this.select.value;
    const config = this.forms.get(strategy).collect();
    return Object.keys(config).length ? { strategy, strategy_config: config } : { strategy };
  }
}

let controller = null;

async function runOne(view, body, signal) {
  view.start(`${body.strategy}${body.strategy_config ? " " + JSON.stringify(body.strategy_config) : ""}`);
  try {
    await api.streamChat({ ...body, return_trace: true }, (chunk) => view.chunk(chunk), signal);
    view.done();
    return view.alignment;
  } catch (error) {
    view.fail(error.name === "AbortError" ? { message: "Stopped." } : error);
    return null;
  }
}

function comparison(results) {
  const row = (label, cells) => h("tr", {}, h("th", {}, label), cells.map((c) => h("td", {}, c)));
  return h("table", { class: "comparison", id: "comparison" },
    h("thead", {}, h("tr", {}, h("th", {}, ""), results.map((r) => h("th", {}, r.strategy)))),
    h("tbody", {},
      row("reward", results.map((r) => (r.alignment?.rewards || []).map((x) => fmt(x)).join(", ") || "–")),
      row("engine tokens", results.map((r) => r.alignment?.engine_tokens?.total_tokens ?? "–")),
      row("generated tokens", results.map((r) => r.alignment?.engine_tokens?.completion_tokens ?? "–")),
      row("engine calls", results.map((r) => r.alignment?.engine_calls ?? "–")),
      row("elapsed (s)", results.map((r) => fmt(r.alignment?.elapsed_seconds)))));
}

async function run(panels, views) {
  controller?.abort();
  controller = new AbortController();
  const signal = controller.signal;
  const compare = $("compare").checked;
  $("form-error").textContent = "";
  $("comparison-box").replaceChildren();
  let bodies;
  try {
    const shared = requestFields(panels.editor);
    const sides = compare ? [panels.a, panels.b] : [panels.a];
    bodies = sides.map((panel) => ({ ...shared, ...panel.body() }));
  } catch (error) {
    $("form-error").textContent = error.message;
    return;
  }
  $("run").disabled = true;
  try {
    // One after the other: sharing the engine would blur each one's elapsed time.
    const results = [];
    for (const [i, body] of bodies.entries()) {
      results.push({ strategy: body.strategy, alignment: await runOne(views[i], body, signal) });
      if (signal.aborted) break;
    }
    if (compare) $("comparison-box").append(h("h3", {}, "Comparison"), comparison(results));
  } finally {
    $("run").disabled = false;
  }
}

async function main() {
  const status = $("load-status");
  const editor = new MessageEditor($("messages-box"), [
    { role: "user", content: "How do owls hunt at night?" },
  ]);
  let models;
  let strategies;
  let rewards;
  try {
    [models, strategies, rewards] = await Promise.all([
      api.getJson("models"), api.getJson("strategies"), api.getJson("rewards"),
    ]);
  } catch (error) {
    status.textContent = `Could not load the server's lists: ${error.message}`;
    status.classList.add("error");
    return;
  }
  for (const model of models.data) $("model").append(h("option", { value: model.id }, model.id));
  for (const reward of rewards.data) {
    $("reward").append(h("option", { value: reward.name }, `${reward.name}${reward.default ? " (default)" : ""}`));
  }
  const panels = {
    editor,
    a: new StrategyPanel("a", strategies.data, "best_of_n"),
    b: new StrategyPanel("b", strategies.data, "tpo"),
  };
  const views = [new RunView($("result-a")), new RunView($("result-b"))];
  const toggle = () => {
    const on = $("compare").checked;
    $("panel-b").hidden = !on;
    $("result-b").hidden = !on;
    $("results").classList.toggle("two", on);
  };
  $("compare").addEventListener("change", toggle);
  toggle();
  $("run").addEventListener("click", () => run(panels, views));
  $("stop").addEventListener("click", () => controller?.abort());
  status.textContent = "";
  document.body.dataset.ready = "true";
}

main();
