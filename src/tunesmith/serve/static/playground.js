// The Try it screen: a classifier labels typed or pasted texts (one per line) or a file's first column,
// through its trained head, with the probability of the label it gives.

import { $, api, el, table } from "./dom.js";

export async function refreshClassifiers(preferred) {
  const { classifiers } = await api("/api/classifiers");
  const select = $("#try-model"), current = select.value;
  select.replaceChildren(...classifiers.map((name) => el("option", { value: name }, name)));
  const pick = [current, preferred].find((name) => name && classifiers.includes(name));
  if (pick) select.value = pick;
  $("#try-status").textContent = classifiers.length ? "" : "no classifier yet: train one with the task 'Label texts'";
}

async function fileTexts(file) {
  const lines = (await file.text()).split(/\r?\n/).filter((line) => line.trim());
  const csv = /\.(csv|tsv)$/i.test(file.name);
  const first = (line) => (csv ? line.split(/\.tsv$/i.test(file.name) ? "\t" : ",")[0].replace(/^"|"$/g, "") : line);
  return (csv ? lines.slice(1) : lines).map(first).slice(0, 200);
}

export async function classifyTexts() {
  const file = $("#try-file").files[0];
  const texts = file ? await fileTexts(file) : $("#try-input").value.split("\n").filter((line) => line.trim());
  if (!texts.length) return $("#try-status").textContent = "type a text to label first";
  $("#try-status").textContent = `labelling ${texts.length} text${texts.length > 1 ? "s" : ""} ...`;
  const result = await api("/api/classify", { method: "POST", body: { model: $("#try-model").value, texts } });
  table($("#try-table"), ["text", "label", "confidence"], result.results.map((row) =>
    [row.text, el("strong", { class: "label" }, row.label), `${(100 * row.confidence).toFixed(0)}%`]));
  $("#try-status").textContent = `labelled by ${result.model} (labels: ${result.labels.join(", ")})`;
}
