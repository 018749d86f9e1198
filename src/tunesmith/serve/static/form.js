// The recipe form, generated from the recipe's JSON schema (Recipe.model_json_schema()): every
// field with its description and default; the method section switches with `kind`; optional
// sections are switched on by a checkbox. Only the fields a person set are sent, so defaults stay
// the recipe's own.

import { el } from "./dom.js";

const OPEN_SECTIONS = new Set(["model", "data", "method", "train", "output"]);
const DEFAULT_KINDS = ["lora", "sft"];  // the recipe defaults of method.kind and stage.kind

export class RecipeForm {
  constructor(form, schema, onChange) {
    this.form = form;
    this.schema = schema;
    this.onChange = onChange;
    this.values = {};
    form.addEventListener("input", () => this.changed());
    form.addEventListener("change", () => this.changed());
  }

  resolve(node) {
    while (node && node.$ref) node = this.schema.$defs[node.$ref.split("/").pop()];
    return node || {};
  }

  // {kind: "section"|"optional-section"|"union"|"value", node}
  classify(node) {
    const resolved = this.resolve(node);
    if (node.discriminator || resolved.discriminator) return { kind: "union", node: node.discriminator ? node : resolved };
    if (resolved.properties) return { kind: "section", node: resolved };
    if (node.anyOf) {
      const others = node.anyOf.filter((option) => option.type !== "null");
      const nullable = others.length < node.anyOf.length;
      if (others.length === 1 && this.resolve(others[0]).properties) return { kind: "optional-section", node: this.resolve(others[0]) };
      if (others.length === 1) return { kind: "value", node: { ...others[0], nullable, description: node.description, default: node.default } };
    }
    return { kind: "value", node: resolved };
  }

  render(values = {}) {
    this.values = JSON.parse(JSON.stringify(values));
    this.form.replaceChildren(...this.sectionChildren(this.schema, []));
    this.changed();
  }

  sectionChildren(section, path) {
    const children = [];
    for (const [name, property] of Object.entries(section.properties || {})) {
      const fieldPath = [...path, name];
      const { kind, node } = this.classify(property);
      const description = property.description || node.description || "";
      if (kind === "section") {
        children.push(this.details(name, description, fieldPath, this.sectionChildren(node, fieldPath), path.length === 0 && OPEN_SECTIONS.has(name)));
      } else if (kind === "optional-section") {
        children.push(this.optionalSection(name, description, node, fieldPath));
      } else if (kind === "union") {
        children.push(this.union(name, description, node, fieldPath));
      } else if (name === "trust_remote_code") {
        continue;  // never from the browser: the server refuses it too
      } else if (!(node.const !== undefined && name === "kind")) {
        children.push(this.field(name, node, fieldPath, property.default ?? node.default, description));
      }
    }
    return children;
  }

  details(name, description, path, children, open) {
    return el("details", { open, dataset: { section: path.join(".") } },
      el("summary", { title: description }, name), el("small", {}, description), ...children);
  }

  optionalSection(name, description, node, path) {
    const enabled = getAt(this.values, path) != null;
    const body = el("div", {}, enabled ? this.sectionChildren(node, path) : []);
    const toggle = el("input", { type: "checkbox", checked: enabled, dataset: { optional: path.join(".") } });
    toggle.addEventListener("change", () => {
      body.replaceChildren(...(toggle.checked ? this.sectionChildren(node, path) : []));
    });
    return el("details", { open: enabled }, el("summary", { title: description }, name),
      el("label", {}, toggle, ` use ${name}`), el("small", {}, " ", description), body);
  }

  union(name, description, node, path) {
    const mapping = node.discriminator.mapping;
    const key = node.discriminator.propertyName;
    const current = (getAt(this.values, path) || {})[key] || Object.keys(mapping).find((k) => DEFAULT_KINDS.includes(k)) || Object.keys(mapping)[0];
    const body = el("div");
    const select = el("select", { dataset: { path: [...path, key].join("."), kind: "union" }, "aria-label": `${name} ${key}` },
      Object.keys(mapping).map((option) => el("option", { value: option, selected: option === current }, option)));
    const show = (choice) => body.replaceChildren(...this.sectionChildren(this.resolve({ $ref: mapping[choice] }), path));
    select.addEventListener("change", () => show(select.value));
    show(current);
    return el("details", { open: true, dataset: { section: path.join(".") } }, el("summary", { title: description }, name),
      el("div", { class: "field" }, el("label", {}, key), select, el("small", {}, description),
        el("span", { class: "field-error", dataset: { errorFor: [...path, key].join(".") } })), body);
  }

  field(name, node, path, defaultValue, description) {
    const id = `f-${path.join("-")}`;
    const given = getAt(this.values, path);
    const type = node.enum ? "enum" : node.type === "boolean" ? "boolean" : node.type === "integer" || node.type === "number" ? "number"
      : node.type === "string" ? "string" : node.type === "array" && node.items && node.items.type === "string" ? "list" : "json";
    const attributes = { id, title: description, dataset: { path: path.join("."), type } };
    let input;
    if (type === "enum" || type === "boolean") {
      const options = type === "enum" ? node.enum : [true, false];
      input = el("select", attributes, el("option", { value: "" }, `default (${JSON.stringify(defaultValue)})`),
        options.map((option) => el("option", { value: JSON.stringify(option), selected: given !== undefined && given === option }, String(option))));
    } else {
      const shown = given === undefined ? "" : type === "list" ? [].concat(given).join(", ") : type === "json" ? JSON.stringify(given)
        : String(given);
      input = el("input", { ...attributes, type: type === "number" ? "number" : "text", step: type === "number" ? "any" : undefined,
        value: shown, placeholder: defaultValue === undefined ? "required" : JSON.stringify(defaultValue) });
    }
    return el("div", { class: "field" }, el("label", { for: id }, name), input, el("small", {}, description),
      el("span", { class: "field-error", dataset: { errorFor: path.join(".") } }));
  }

  // The recipe as a mapping of the fields that were set.
  collect() {
    const recipe = {};
    for (const toggle of this.form.querySelectorAll("[data-optional]")) {
      if (toggle.checked) setAt(recipe, toggle.dataset.optional.split("."), {});
    }
    for (const input of this.form.querySelectorAll("[data-path]")) {
      const path = input.dataset.path.split(".");
      const text = input.value.trim();
      if (input.dataset.kind === "union") { setAt(recipe, path, input.value); continue; }
      if (text === "") continue;
      const type = input.dataset.type;
      let value = text;
      if (type === "number") value = Number(text);
      else if (type === "enum" || type === "boolean") value = JSON.parse(text);
      else if (type === "list") value = text.split(",").map((part) => part.trim()).filter(Boolean);
      else if (type === "json") { try { value = JSON.parse(text); } catch { value = text; } }
      setAt(recipe, path, value);
    }
    return recipe;
  }

  set(path, value) {
    const input = this.form.querySelector(`[data-path="${path}"]`);
    if (!input) return;
    input.value = Array.isArray(value) ? value.join(", ") : String(value);
    this.changed();
  }

  changed() { this.onChange(this.collect()); }

  // Show each error beside its field (the nearest enclosing field or section); returns those placed nowhere.
  showErrors(errors) {
    for (const span of this.form.querySelectorAll(".field-error")) span.textContent = "";
    for (const box of this.form.querySelectorAll(".section-error")) box.remove();
    const unplaced = [];
    for (const error of errors) {
      const parts = error.loc.split(".");
      const candidates = [];
      for (let size = parts.length; size > 0; size--) {
        candidates.push(parts.slice(0, size).join("."));
        if (parts[0] === "method" && size > 2) candidates.push(["method", ...parts.slice(2, size)].join("."));
      }
      const span = candidates.map((loc) => this.form.querySelector(`[data-error-for="${loc}"]`)).find(Boolean);
      const section = !span && candidates.map((loc) => this.form.querySelector(`[data-section="${loc}"]`)).find(Boolean);
      if (span) span.textContent = error.message;
      else if (section) section.append(el("p", { class: "field-error section-error" }, error.message));
      else unplaced.push(error);
    }
    return unplaced;
  }
}

export function getAt(object, path) {
  return path.reduce((node, key) => (node == null ? undefined : node[key]), object);
}

export function setAt(object, path, value) {
  let node = object;
  path.slice(0, -1).forEach((key) => { node = node[key] = node[key] && typeof node[key] === "object" ? node[key] : {}; });
  node[path[path.length - 1]] = value;
}
