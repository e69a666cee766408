// A form generated from a strategy's config JSON schema (pydantic's model_json_schema), so a
// new strategy gets its form with no change here.
//
//   enum (or const)              -> <select>
//   integer / number             -> <input type=number> with the schema's min/max
//   boolean                      -> <input type=checkbox>
//   string                       -> <input type=text>
//   object ($ref to a model)     -> <fieldset> of its own fields, recursively
//   array, tuple, other unions   -> <input type=text> holding JSON
//   anyOf [X, null] (optional)   -> X's input; left empty, the field is omitted
//
// Every input carries data-path (dotted, e.g. "generation.temperature") and data-kind (one
// of the kinds above). collect() sends only what differs from the schema's defaults.

import { h } from "./dom.js";

const OMIT = Symbol("omit");

/** Follow a local "$ref" (and pydantic's single-item allOf wrapper) to its definition. */
function resolve(node, defs) {
  let current = node || {};
  for (let hops = 0; hops < 32; hops++) {
    if (current.$ref) {
      const name = current.$ref.split("/").pop();
      current = { ...(defs[name] || {}), ...withoutRef(current) };
    } else if (Array.isArray(current.allOf) && current.allOf.length === 1) {
      const { allOf, ...rest } = current;
      current = { ...allOf[0], ...rest };
    } else {
      return current;
    }
  }
  return current;
}

function withoutRef(node) {
  const { $ref, ...rest } = node;
  return rest;
}

/** The input kind a property gets, with the schema it is drawn from and whether null is ok. */
export function classify(property, defs) {
  let schema = resolve(property, defs);
  let nullable = false;
  if (Array.isArray(schema.anyOf)) {
    const others = schema.anyOf.filter((branch) => branch.type !== "null");
    nullable = others.length < schema.anyOf.length;
    if (others.length !== 1) return { kind: "json", schema, nullable };
    const { anyOf, ...outer } = schema;
    schema = { ...resolve(others[0], defs), ...outer };
  }
  if (Array.isArray(schema.enum)) return { kind: "enum", schema, nullable };
  if ("const" in schema) return { kind: "enum", schema: { ...schema, enum: [schema.const] }, nullable };
  const kinds = {
    integer: "integer",
    number: "number",
    boolean: "boolean",
    string: "string",
  };
  if (kinds[schema.type]) return { kind: kinds[schema.type], schema, nullable };
  if (schema.type === "object" && schema.properties) return { kind: "object", schema, nullable };
  return { kind: "json", schema, nullable };
}

function sameValue(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** One leaf input and how to read it back. */
function leafInput(kind, schema, nullable, fallback, id) {
  const common = { id, dataset: { kind } };
  if (kind === "enum") {
    const select = h("select", common);
    if (nullable) select.append(h("option", { value: "" }, "(default)"));
    schema.enum.forEach((value, index) =>
      select.append(h("option", { value: String(value), dataset: { index } }, String(value))));
    select.value = fallback === null || fallback === undefined ? "" : String(fallback);
    const read = () => {
      if (select.value === "") return OMIT;
      return schema.enum[Number(select.selectedOptions[0].dataset.index)];
    };
    return { input: select, read };
  }
  if (kind === "integer" || kind === "number") {
    const low = schema.minimum ?? schema.exclusiveMinimum;
    const high = schema.maximum ?? schema.exclusiveMaximum;
    const input = h("input", {
      ...common,
      type: "number",
      min: low,
      max: high,
      step: kind === "integer" ? 1 : "any",
      value: fallback ?? "",
      placeholder: nullable ? "default" : null,
    });
    const read = () => (input.value.trim() === "" ? OMIT : Number(input.value));
    return { input, read };
  }
  if (kind === "boolean") {
    const input = h("input", { ...common, type: "checkbox" });
    input.checked = fallback === true;
    return { input, read: () => input.checked };
  }
  if (kind === "string") {
    const input = h("input", {
      ...common,
      type: "text",
      value: fallback ?? "",
      placeholder: nullable ? "default" : null,
    });
    return { input, read: () => (input.value === "" && nullable ? OMIT : input.value) };
  }
  const input = h("input", {
    ...common,
    type: "text",
    class: "json-input",
    spellcheck: "false",
    value: fallback === null || fallback === undefined ? "" : JSON.stringify(fallback),
    placeholder: "JSON",
  });
  const read = () => {
    if (input.value.trim() === "") return OMIT;
    try {
      return JSON.parse(input.value);
    } catch {
      throw new Error("is not valid JSON");
    }
  };
  return { input, read };
}

/**
 * Build the fields of an object schema into `container`; returns the leaves to collect.
 * `defaults` is the enclosing default object, which wins over the properties' own defaults.
 */
function buildFields(container, objectSchema, defs, prefix, idPrefix, defaults) {
  const leaves = [];
  for (const [name, property] of Object.entries(objectSchema.properties || {})) {
    const path = prefix ? `${prefix}.${name}` : name;
    const { kind, schema, nullable } = classify(property, defs);
    const own = "default" in property ? property.default : schema.default;
    const fallback = defaults && name in defaults ? defaults[name] : own;
    const title = property.title || name;
    const help = property.description || schema.description || "";
    if (kind === "object") {
      const fieldset = h("fieldset", { dataset: { path, kind } }, h("legend", { title: help }, title));
      container.append(fieldset);
      leaves.push(...buildFields(fieldset, schema, defs, path, idPrefix, fallback || null));
      continue;
    }
    const id = `${idPrefix}-${path}`;
    const { input, read } = leafInput(kind, schema, nullable, fallback, id);
    input.dataset.path = path;
    const label = h("label", { for: id, title: help }, title);
    const row = h("div", { class: `field field-${kind}` }, label, input);
    if (help) row.append(h("small", { class: "help" }, help));
    container.append(row);
    leaves.push({ path, read, fallback, input });
  }
  return leaves;
}

/**
 * The form of one strategy's config schema.
 * @returns {{element: HTMLElement, collect: () => object}} collect() returns the changed
 *   fields as a nested object, and throws Error("<path> ...") for a field it cannot read.
 */
export function configForm(schema, idPrefix) {
  const defs = schema.$defs || schema.definitions || {};
  const element = h("div", { class: "config-fields" });
  const leaves = buildFields(element, resolve(schema, defs), defs, "", idPrefix, null);
  if (!leaves.length) element.append(h("p", { class: "muted" }, "No settings."));
  const collect = () => {
    const config = {};
    for (const leaf of leaves) {
      let value;
      try {
        value = leaf.read();
      } catch (error) {
        leaf.input.classList.add("invalid");
        throw new Error(`strategy_config.${leaf.path} ${error.message}`);
      }
      leaf.input.classList.remove("invalid");
      if (value === OMIT || sameValue(value, leaf.fallback)) continue;
      setPath(config, leaf.path.split("."), value);
    }
    return config;
  };
  return { element, collect };
}

function setPath(target, keys, value) {
  let node = target;
  for (const key of keys.slice(0, -1)) node = node[key] ??= {};
  node[keys[keys.length - 1]] = value;
}
