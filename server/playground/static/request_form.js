// The request's own fields: messages, sampling, reward and constraints. Empty fields are left
// out of the body, so the server's defaults apply.

import { h } from "./dom.js";

const ROLES = ["system", "user", "assistant"];

/** The editable message list inside `container`. */
export class MessageEditor {
  constructor(container, initial) {
    this.list = h("ol", { class: "messages", id: "messages" });
    const adders = ROLES.map((role) => h("button", {
      type: "button",
      id: `add-${role}`,
      class: "small",
      onclick: () => this.add(role, ""),
    }, `+ ${role}`));
    container.append(this.list, h("div", { class: "row" }, adders));
    for (const message of initial) this.add(message.role, message.content);
  }

  add(role, content) {
    const select = h("select", { class: "role", "aria-label": "role" },
      ROLES.map((r) => h("option", { value: r }, r)));
    select.value = role;
    const text = h("textarea", { class: "content", rows: 3, "aria-label": "content" });
    text.value = content;
    const item = h("li", { class: "message" }, select, text,
      h("button", { type: "button", class: "small remove", title: "remove", onclick: () => item.remove() }, "×"));
    this.list.append(item);
    return item;
  }

  messages() {
    return [...this.list.querySelectorAll(".message")].map((item) => ({
      role: item.querySelector(".role").value,
      content: item.querySelector(".content").value,
    }));
  }
}

function number(id) {
  const value = document.getElementById(id).value.trim();
  return value === "" ? undefined : Number(value);
}

/**
 * The body's shared fields (all but strategy and strategy_config). Throws Error for
 * constraints that are not JSON.
 */
export function requestFields(editor) {
  const body = {
    model: document.getElementById("model").value || undefined,
    messages: editor.messages(),
    max_tokens: number("max-tokens"),
    temperature: number("temperature"),
    top_p: number("top-p"),
    seed: number("seed"),
    n: number("n"),
    reward: document.getElementById("reward").value || undefined,
  };
  const constraints = document.getElementById("constraints").value.trim();
  if (constraints) {
    try {
      body.constraints = JSON.parse(constraints);
    } catch {
      throw new Error("constraints is not valid JSON");
    }
  }
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined));
}
