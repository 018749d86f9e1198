// The studio: nine screens, each a client of the server's HTTP API (/api and /v1).

import { $, api, bubble, el, notice, streamChat, table } from "./dom.js";
import { drawChart } from "./chart.js";
import { RecipeForm } from "./form.js";
import { classifyTexts, refreshClassifiers } from "./playground.js";

const state = { dataFile: null, form: null, recipe: {}, job: null, poll: null, metrics: [], logOffset: 0, chat: null,
  columns: {}, screen: "data" };
const ROLES = ["prompt", "answer", "label", "system"];

// The screen, job and data choices live in the URL (#screen&job=3&data=...), so a reload comes back to them.
function saveLocation() {
  const params = new URLSearchParams({ screen: state.screen });
  if (state.job) params.set("job", state.job);
  if (state.dataFile) params.set("data", state.dataFile);
  if ($("#test-file").value) params.set("test", $("#test-file").value);
  for (const role of ROLES) if (state.columns[role]) params.set(role, state.columns[role]);
  history.replaceState(null, "", `#${params}`);
}

function savedLocation() {
  return new URLSearchParams(location.hash.slice(1));
}

// --- navigation ------------------------------------------------------------------------------------

function show(screen) {
  notice("");
  state.screen = screen;
  saveLocation();
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.screen === screen);
  for (const section of document.querySelectorAll(".screen")) section.classList.toggle("active", section.id === `screen-${screen}`);
  const refresh = { data: refreshDataFiles, runs: refreshRuns, chat: refreshChatModels, evaluate: refreshEvaluate,
    export: refreshExports, try: () => refreshClassifiers(state.lastRun), recipe: refreshTasks };
  if (refresh[screen]) refresh[screen]();
}

// --- data ------------------------------------------------------------------------------------------

async function refreshDataFiles(selected, test) {
  const { files } = await api("/api/files?folder=data");
  const select = $("#data-file"), testSelect = $("#test-file");
  const current = selected || select.value || state.dataFile;
  const currentTest = test ?? testSelect.value;
  const plain = files.filter((f) => !f.folder);
  select.replaceChildren(...plain.map((f) =>
    el("option", { value: f.path, selected: f.path === current }, `${f.name} (${f.size} bytes)`)));
  testSelect.replaceChildren(el("option", { value: "" }, "none: keep some rows aside"), ...plain.map((f) =>
    el("option", { value: f.path, selected: f.path === currentTest }, f.name)));
}

async function upload() {
  const files = [...$("#upload-file").files];
  if (!files.length) return notice("choose a file first", true);
  const stored = [];
  for (const file of files) {
    const body = new FormData();
    body.append("file", file);
    stored.push((await api("/api/upload", { method: "POST", raw: body })).path);
  }
  // two files at once: the one named like a test set is the test file
  const isTest = (path) => /(^|[^a-z])(test|eval|holdout|held-out|validation|dev)([^a-z]|$)/i.test(path.split("/").pop());
  const train = stored.find((path) => !isTest(path)) || stored[0];
  const test = stored.length > 1 ? (stored.find((path) => path !== train && isTest(path)) || stored.find((path) => path !== train)) : "";
  state.dataFile = train;
  state.columns = {};
  notice(`uploaded ${stored.join(" and ")}${test ? ` (${test} is the test file)` : ""}`);
  await refreshDataFiles(train, test);
  await preview(true);
}

function cellText(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function fillColumnPickers(columns, mapping) {
  for (const role of ROLES) {
    const select = $(`#col-${role}`);
    select.replaceChildren(el("option", { value: "" }, "(none)"), ...columns.map((c) => el("option", { value: c }, c)));
    select.value = mapping[role] && columns.includes(mapping[role]) ? mapping[role] : "";
  }
}

function readColumnPickers() {
  const mapping = {};
  for (const role of ROLES) if ($(`#col-${role}`).value) mapping[role] = $(`#col-${role}`).value;
  return mapping;
}

function columnQuery(mapping) {
  return ROLES.filter((role) => mapping[role]).map((role) => `&${role}=${encodeURIComponent(mapping[role])}`).join("");
}

// guess: take the server's suggested mapping for a file seen for the first time
async function preview(guess = false) {
  const path = $("#data-file").value;
  if (!path) return;
  if (path !== state.dataFile) { state.dataFile = path; guess = true; }
  let result = await api(`/api/data/preview?path=${encodeURIComponent(path)}&limit=20${guess ? "" : columnQuery(state.columns)}`);
  if (guess) {
    const suggested = Object.fromEntries(Object.entries(result.suggested).filter(([, column]) => column));
    state.columns = result.format ? {} : suggested;  // a file in a known format needs no mapping
    if (Object.keys(state.columns).length) {
      result = await api(`/api/data/preview?path=${encodeURIComponent(path)}&limit=20${columnQuery(state.columns)}`).catch(() => result);
    }
  }
  fillColumnPickers(result.columns, state.columns);
  $("#columns").hidden = result.format !== null && result.format !== "columns";
  saveLocation();
  $("#data-error").textContent = result.format_error || "";
  $("#data-format").textContent = result.format === "columns"
    ? `columns: ${ROLES.filter((r) => state.columns[r]).map((r) => `${r} = ${state.columns[r]}`).join(", ")}; first ${result.rows.length} rows as the model sees them`
    : result.format ? `format: ${result.format}; first ${result.rows.length} records` : "say which column holds what (above)";
  const columns = result.columns;
  table($("#preview-table"), columns, result.rows.map((row) => columns.map((c) => cellText(row[c] ?? ""))));
  $("#preview-bubbles").replaceChildren(...result.examples.slice(0, 6).flatMap((example) => [
    ...(example.messages || []).map((m) => bubble(m.role, m.content)),
    ...(example.text ? [bubble("assistant", example.text)] : []),
    ...(example.error ? [el("p", { class: "error" }, example.error)] : []),
    el("hr"),
  ]));
  if (result.format) await inspect();
}

async function columnsChanged() {
  state.columns = readColumnPickers();
  await preview();
}

async function inspect() {
  const path = $("#data-file").value;
  const body = { path };
  if (Object.keys(state.columns).length) body.columns = state.columns;
  const report = await api("/api/data/inspect", { method: "POST", body });
  $("#inspect-report").textContent = `${report.records} records give ${report.examples} training examples; ` +
    `exact duplicates ${report.exact_duplicates}, near duplicates ${report.near_duplicates}, empty ${report.empty}, ` +
    `unreadable ${report.malformed}\nlength in words: ${JSON.stringify(report.length)}\n${report.verdict}` +
    (report.malformed_examples.length ? `\nfirst problem: ${report.malformed_examples[0]}` : "");
}

async function refreshCai() {
  const [{ files }, { data }] = await Promise.all([api("/api/files?folder=data"), api("/v1/models")]);
  const plain = files.filter((f) => !f.folder);
  for (const [id, guess] of [["#cai-principles", /principle/], ["#cai-prompts", /prompt/]]) {
    const select = $(id), current = select.value;
    select.replaceChildren(...plain.map((f) => el("option", { value: f.path, selected: f.path === current || (!current && guess.test(f.name)) }, f.name)));
  }
  const current = $("#cai-model").value;
  $("#cai-model").replaceChildren(...data.map((m) => el("option", { value: m.id, selected: m.id === current }, m.id)));
}

async function cai() {
  const body = { kind: "cai", principles: $("#cai-principles").value, prompts: $("#cai-prompts").value, model: $("#cai-model").value };
  if ($("#cai-limit").value) body.limit = Number($("#cai-limit").value);
  const job = await api("/api/jobs", { method: "POST", body });
  $("#cai-status").textContent = `job ${job.id}: ${job.title} running ...`;
  const done = await waitForJob(job.id);
  const folder = done.output.replace(/\/summary\.json$/, "");
  $("#cai-status").textContent = done.status === "done"
    ? `job ${job.id} done: ${folder}/sft.jsonl (train with "Answer questions or chat") and ${folder}/preference.jsonl ("Prefer better answers")`
    : `job ${job.id} ${done.status}: see its log on the Runs screen`;
  await refreshDataFiles();
}

async function dataStep(step) {
  const job = await api("/api/jobs", { method: "POST", body: { kind: "data", step, path: $("#data-file").value } });
  notice(`job ${job.id}: ${job.title} queued; the result will be ${job.output}`);
  const done = await waitForJob(job.id);
  notice(`job ${job.id} ${done.status}: ${done.output}`);
  await refreshDataFiles();
}

async function waitForJob(id) {
  for (;;) {
    const job = await api(`/api/jobs/${id}`);
    if (["done", "failed", "stopped", "interrupted", "cancelled"].includes(job.status)) return job;
    await new Promise((resolve) => setTimeout(resolve, 700));
  }
}

// --- recipe and plan -------------------------------------------------------------------------------

let checkTimer = null;
function recipeChanged(recipe) {
  state.recipe = recipe;
  clearTimeout(checkTimer);
  checkTimer = setTimeout(checkRecipe, 250);
}

async function checkRecipe() {
  const result = await api("/api/recipe/check", { method: "POST", body: { recipe: state.recipe } });
  state.recipeChecked = result.valid;
  $("#recipe-yaml").textContent = result.yaml;
  const link = $("#download-yaml");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([result.yaml], { type: "text/yaml" }));
  const unplaced = state.form.showErrors(result.errors);
  $("#recipe-errors").textContent = unplaced.map((e) => `${e.loc}: ${e.message}`).join("; ");
  if (result.errors.length && !unplaced.length && state.dataFile) $("#recipe-errors").textContent = "some settings need a fix: see All settings";
  $("#recipe-form").dataset.valid = String(result.valid);
  return result;
}

function starterRecipe(model) {
  const name = $("#run-name").value || "studio-run";
  const test = $("#test-file").value;
  return {
    model: { name: model },
    data: { train: state.dataFile ? [state.dataFile] : [], max_length: 128, template: "simple",
      ...(test ? { validation: test } : { validation_fraction: 0.1 }) },
    method: { kind: "lora", r: 4, alpha: 8 },
    train: { max_steps: 30, batch_size: 4, lr: 0.001, log_every: 1, checkpoint_every: 5 },
    output: { dir: `runs/${name}` },
  };
}

async function setUpRecipe() {
  const [schema, { models }] = await Promise.all([api("/api/recipe/schema"), api("/api/recipe/models")]);
  const picker = $("#model-picker");
  picker.replaceChildren(...models.map((m) => el("option", { value: m.id }, `${m.id} (${m.kind})`)));
  const preferred = models.find((m) => m.kind === "base") || models.find((m) => m.kind === "alias") || models[0];  // never an export by default
  if (preferred) picker.value = preferred.id;
  state.form = new RecipeForm($("#recipe-form"), schema, recipeChanged);
  state.form.render(starterRecipe(picker.value));
  picker.addEventListener("change", () => state.form.set("model.name", picker.value));
  $("#run-name").addEventListener("input", () => {
    const valid = $("#run-name").checkValidity();
    $("#recipe-errors").textContent = valid ? "" : "run name: use letters, digits, _ . - (starting with a letter or digit)";
    if (valid) state.form.set("output.dir", `runs/${$("#run-name").value}`);
  });
}

// --- the guided path: the task in the person's words -> a whole recipe (server: /api/guided) ---------------

async function refreshTasks() {
  if ($("#guided-tasks").childElementCount) return;
  const { tasks, preference_stages: stages } = await api("/api/guided/tasks");
  $("#guided-preference").replaceChildren(...Object.entries(stages).map(([name, what]) => el("option", { value: name }, what)));
  $("#guided-tasks").replaceChildren(...tasks.map((task) => el("label", { class: "task" },
    el("input", { type: "radio", name: "task", value: task.name, onchange: () => pickTask(task.name) }),
    el("strong", {}, task.title), el("small", {}, ` ${task.example}; measured by ${task.metric}`))));
}

function pickTask(task) {
  state.task = task;
  $("#guided-prefer").hidden = task !== "prefer";
  $("#guided-rewards").hidden = task !== "practise";
  guided(task).catch((error) => notice(error.message, true));
}

function guidedRewards() {  // the built-in rewards ticked on the Recipe screen (never user code)
  const rewards = [];
  if ($("#reward-exact_match").checked) rewards.push({ kind: "exact_match" });
  if ($("#reward-answer_match").checked) rewards.push({ kind: "answer_match", ...($("#reward-answer-pattern").value ? { pattern: $("#reward-answer-pattern").value } : {}) });
  if ($("#reward-format").checked) rewards.push({ kind: "format", pattern: $("#reward-format-pattern").value });
  if ($("#reward-length").checked) rewards.push({ kind: "length", target: Number($("#reward-length-target").value) });
  return rewards;
}

async function guided(task) {
  if (!state.dataFile) return notice("pick your data on the Data screen first", true);
  $("#guided-status").textContent = "working out the recipe for this machine (the plan loads the model once) ...";
  $("#guided-reasons").replaceChildren();
  const body = { task, data: state.dataFile, columns: state.columns, model: $("#model-picker").value };
  if ($("#test-file").value) body.test = $("#test-file").value;
  if (task === "prefer") body.preference = $("#guided-preference").value;
  if (task === "practise") body.rewards = guidedRewards();
  const result = await api("/api/guided/recipe", { method: "POST", body }).catch((error) => {
    $("#guided-status").textContent = "";
    throw error;
  });
  state.form.render(result.recipe);
  $("#run-name").value = result.recipe.output.dir.replace(/^runs\//, "");
  $("#guided-status").textContent = `ready: ${result.recipe.output.dir}. Press Train, or change anything under All settings.`;
  $("#guided-reasons").replaceChildren(...result.reasons.map((line) => el("li", {}, line)));
  await checkRecipe();
}

async function uploadYaml() {
  const file = $("#upload-yaml").files[0];
  if (!file) return;
  const { recipe } = await api("/api/recipe/parse", { method: "POST", raw: await file.text() });
  state.form.render(recipe);
  notice(`loaded ${file.name}`);
}

async function plan() {
  const result = await api("/api/plan", { method: "POST", body: { recipe: state.recipe } });
  const parts = Object.entries(result.memory_parts_mb).map(([part, mb]) => `${part} ${mb}`).join(", ");
  const rows = [["model", result.model], ["method", result.method],
    ["parameters with the method", result.total_parameters.toLocaleString()],
    ["trainable", `${result.trainable_parameters.toLocaleString()} (${(100 * result.trainable_share).toFixed(3)}%)`],
    ["peak memory", `${result.memory_mb} MB (${parts} MB)`],
    ["fits this machine", result.available_mb ? `${result.fits ? "yes" : "no"}: ${result.available_mb} MB available` : "unknown"],
    ["data", `${result.data_verdict}: ${result.data_note}`], ["steps", result.steps],
    ["batch size", result.batch_size], ["max length", result.max_length],
    ["recommendation", result.recommendation || "-"], ["not yet known", result.note]];
  table($("#plan-table"), ["", ""], rows);
  show("plan");
}

async function train() {
  const check = await checkRecipe();
  if (!check.valid) {
    $("#full-form").open = true;  // errors next to their fields
    return notice("fix the recipe first: the errors are shown at their fields", true);
  }
  const saved = await api("/api/recipes", { method: "POST", body: { recipe: state.recipe, name: $("#run-name").value } });
  const job = await api("/api/jobs", { method: "POST", body: { kind: "train", recipe: saved.path } });
  notice(`job ${job.id} queued: ${job.title} (recipe ${saved.path})`);
  watch(job.id);
}

// --- train (live) ------------------------------------------------------------------------------------

function watch(jobId) {
  clearInterval(state.poll);
  state.job = jobId;
  state.metrics = [];
  state.logText = "";
  state.logOffset = 0;
  state.metricsOffset = 0;
  state.resultShown = false;
  state.totalSteps = undefined;
  $("#train-log").textContent = "";
  $("#train-stats").textContent = "";
  $("#train-result").textContent = "";
  $("#train-examples").replaceChildren();
  $("#train-job").textContent = `job ${jobId}: starting`;
  $("#train-job").dataset.status = "";
  $("#train-status").textContent = "sending the job to the server ...";
  $("#train-chart").dataset.points = "0";
  drawChart($("#train-chart"), []);
  show("train");
  const tick = async () => {
    let update;
    try {
      update = await fetch(`/api/jobs/${jobId}/progress?log_offset=${state.logOffset}&metrics_offset=${state.metricsOffset}`)
        .then((response) => (response.ok ? response.json() : Promise.reject(new Error(String(response.status)))));
      $("#offline").hidden = true;
    } catch (error) {
      $("#offline").hidden = false;
      $("#train-status").textContent = "the server cannot be reached: the job's state is unknown until it answers again";
      return;
    }
    if (state.job !== jobId) return;
    state.logOffset = update.log_offset;
    state.metricsOffset = update.metrics_offset;
    if (update.metrics_offset < state.metrics.length) state.metrics = [];  // resumed: the file was rewound
    state.metrics.push(...update.metrics);
    if (state.totalSteps === undefined && update.metrics.length && update.job.run_dir && update.job.kind === "train") {
      state.totalSteps = null;  // the run's own recipe says how many steps (train.max_steps)
      fetch(`/api/files/raw?path=${encodeURIComponent(`${update.job.run_dir}/config.yaml`)}`)
        .then((response) => (response.ok ? response.text() : ""))
        .then((text) => { const found = /^\s+max_steps:\s*(\d+)/m.exec(text); state.totalSteps = found ? Number(found[1]) : null; })
        .catch(() => {});
    }
    state.logText += update.log;
    const log = $("#train-log");
    log.textContent += update.log;
    log.scrollTop = log.scrollHeight;
    renderTrain(update.job);
    if (!["queued", "running"].includes(update.job.status)) {
      clearInterval(state.poll);
      if (update.job.status === "done" && !state.resultShown) {
        state.resultShown = true;
        await showResult(update.job);
      }
    }
  };
  tick();
  state.poll = setInterval(tick, 1000);
}

// The phase, from what the job itself wrote: its log lines and its metrics file.
function phase(job, log, steps) {
  if (job.status === "queued") return "queued: it starts as soon as no other job is running";
  if (job.status === "failed") {
    const error = log.split("\n").reverse().find((line) => /^error: /.test(line));
    return `failed: ${error ? error.slice(7) : "see the output below"}`;
  }
  if (job.status !== "running") return job.status === "done" ? "done" : job.status;
  const total = state.totalSteps;
  if (/saved (adapter|model|the result)|summary in /.test(log)) return "evaluating after training and writing the summary";
  if (steps.length) {
    const last = steps[steps.length - 1];
    const recent = steps.slice(-10).map((m) => m.step_s).filter((x) => typeof x === "number");
    const perStep = recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : null;
    const eta = perStep && total ? ` about ${Math.max(0, Math.round(perStep * (total - last.step)))} s left (measured ${perStep.toFixed(2)} s a step)` : "";
    return `training: step ${last.step}${total ? ` of ${total}` : ""};${eta || " time left: known after the first steps"}`;
  }
  if (/^method /m.test(log)) return "training: the first steps (time left is known once steps are measured)";
  if (/^(train|validation): /m.test(log)) return /zero-shot|^stage (rm|dpo|kto)/m.test(log) ? "setting up the method" :
    "measuring the base model before training (evaluating before)";
  return "loading the model and preparing the data";
}

function renderTrain(job) {
  $("#train-job").textContent = `job ${job.id} (${job.title}): ${job.status}`;
  $("#train-job").dataset.status = job.status;
  $("#stop-button").disabled = !["queued", "running"].includes(job.status);
  $("#resume-button").disabled = !job.resumable;
  const steps = state.metrics.filter((m) => m.loss !== undefined);
  $("#train-status").textContent = phase(job, state.logText || "", steps);
  $("#train-status").dataset.phase = job.status;
  const validation = state.metrics.filter((m) => m.val_loss !== undefined);
  drawChart($("#train-chart"), [
    { name: "train loss", points: steps.map((m) => [m.step, m.loss]) },
    { name: "validation loss", points: validation.map((m) => [m.step, m.val_loss]) },
  ]);
  $("#train-chart").dataset.points = String(steps.length);
  const last = steps[steps.length - 1];
  if (last) {
    $("#train-stats").textContent = `step ${last.step}, loss ${last.loss.toFixed(4)}, ${Math.round(last.tokens_per_s)} tokens/s, ` +
      `${last.tokens} tokens` + (job.started ? `, elapsed ${((job.finished || Date.now() / 1000) - job.started).toFixed(0)} s` : "");
  }
}

// The task metric before -> after, in words (summary.json of the run).
export function resultSentence(summary) {
  if (!summary) return "";
  const v = summary.validation || {};
  const pct = (x) => `${(100 * x).toFixed(0)}%`;
  if (v.accuracy !== undefined) {
    const before = v.zero_shot_accuracy !== undefined ? `${pct(v.zero_shot_accuracy)} before training (the base model picking a label word)`
      : v.majority_accuracy !== undefined ? `${pct(v.majority_accuracy)} by always giving the most common label` : "";
    return `accuracy on ${v.examples ?? "the"} held-out rows: ${before ? `${before} → ` : ""}${pct(v.accuracy)} after training`;
  }
  if (summary.task) return `${summary.task.metric}: ${summary.task.before.toFixed(3)} before → ${summary.task.after.toFixed(3)} after training`;
  if (v.reward_accuracy !== undefined) return `the better answer wins ${pct(v.reward_accuracy)} of held-out pairs after training`;
  if (summary.val_loss != null) return `held-out loss after training: ${summary.val_loss.toFixed(4)} (lower is better)`;
  return `training loss at the end: ${summary.train_loss?.toFixed(4)}`;
}

// A generation task (eval.task): the same held-out inputs answered before and after training, beside the reference.
async function taskExamples(run) {
  const read = async (name) => {
    const response = await fetch(`/api/files/raw?path=${encodeURIComponent(`${run.path}/${name}`)}`);
    return response.ok ? response.json() : null;
  };
  const [before, after] = await Promise.all([read("task_before.json"), read("task_after.json")]);
  if (!before || !after) return $("#train-examples").replaceChildren();
  table($("#train-examples"), ["input", "before training", "after training", "expected"], after.samples.map((sample, index) =>
    [sample.prompt, before.samples[index]?.prediction ?? "", sample.prediction, sample.reference]));
  $("#train-examples").dataset.source = "task";
}

async function showResult(job) {
  const { runs } = await api("/api/runs");
  const run = runs.find((r) => r.path === job.run_dir);
  if (!run) return;
  state.lastRun = run.path;
  $("#train-result").textContent = resultSentence(run.summary);
  $("#train-result").dataset.ready = "true";
  const { classifiers } = await api("/api/classifiers");
  if (!classifiers.includes(run.path)) return taskExamples(run);
  const found = await api(`/api/runs/examples?path=${encodeURIComponent(run.path)}&limit=5`);
  table($("#train-examples"), ["text", "its label", "the trained model says"], found.examples.map((e) =>
    [e.text, e.expected, `${e.predicted} (${(100 * e.confidence).toFixed(0)}%)${e.predicted === e.expected ? "" : " ✗"}`]));
  $("#train-examples").dataset.source = found.source;
}

// --- evaluate --------------------------------------------------------------------------------------

async function refreshSuites() {
  const { suites } = await api("/api/jobs/suites");
  $("#eval-suite-list").replaceChildren(...(suites.length ? suites.map((suite) => el("label", { class: "task" },
    el("input", { type: "checkbox", class: "eval-suite", value: suite.path, disabled: Boolean(suite.problem) }),
    el("strong", {}, suite.name), el("small", {}, suite.problem ? ` cannot run from the studio: ${suite.problem}` : ` ${suite.tasks.join(", ")}`)))
    : [el("p", {}, "no suite files in suites/ yet: only the bias probe runs")]));
}

async function refreshEvaluate() {
  await Promise.all([refreshRunPickers(), refreshSuites()]);
}

async function refreshRunPickers() {
  const { runs } = await api("/api/runs");
  for (const id of ["#eval-run", "#export-run"]) {
    const select = $(id), current = select.value;
    select.replaceChildren(...runs.filter((r) => r.finished).map((r) => el("option", { value: r.path, selected: r.path === current }, r.name)));
  }
  return runs;
}

async function evaluate() {
  const run = $("#eval-run").value;
  const suites = [...document.querySelectorAll(".eval-suite:checked")].map((box) => box.value);
  const job = await api("/api/jobs", { method: "POST", body: { kind: "eval", run, limit: 8, suites } });
  $("#eval-status").textContent = `job ${job.id} running: ${job.title}`;
  const done = await waitForJob(job.id);
  $("#eval-status").textContent = `job ${job.id} ${done.status}`;
  if (done.status === "done") $("#report-frame").src = `/api/files/raw?path=${encodeURIComponent(done.output)}`;
}

async function openReport() {
  const run = $("#eval-run").value;
  $("#report-frame").src = `/api/files/raw?path=${encodeURIComponent(`${run}/eval/report.html`)}`;
}

// --- chat ------------------------------------------------------------------------------------------

async function refreshChatModels() {
  const { data } = await api("/v1/models");
  for (const [id, pick] of [["#chat-left", (m) => !m.id.startsWith("runs/")], ["#chat-right", (m) => m.id.startsWith("runs/")]]) {
    const select = $(id), current = select.value;
    select.replaceChildren(...data.map((m) => el("option", { value: m.id }, m.id)));
    const fallback = data.find((m) => pick(m) && !m.owned_by.endsWith("alias")) || data[0];
    select.value = current && data.some((m) => m.id === current) ? current : fallback ? fallback.id : "";
  }
}

async function sendChat() {
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  const history = state.chat ? state.chat.history : [];
  if (state.chat && state.chat.answers) history.push({ role: "user", content: state.chat.user }, { role: "assistant", content: state.chat.answers[0] });
  const maxTokens = Math.max(8, Math.min(1024, Number($("#chat-length").value) || 200));
  const messages = [...history, { role: "user", content: text }];
  state.chat = { history, user: text, messages, answers: null };
  const sides = ["left", "right"];
  for (const side of sides) $(`#chat-${side}-log`).append(bubble("user", text));
  $("#prefer-left").disabled = $("#prefer-right").disabled = true;
  const answers = await Promise.all(sides.map(async (side) => {
    const reply = bubble("assistant", "");
    $(`#chat-${side}-log`).append(reply);
    try {
      return await streamChat({ model: $(`#chat-${side}`).value, messages, max_tokens: maxTokens, temperature: 0 },
        (piece, whole) => { reply.textContent = whole; });
    } catch (error) {
      reply.textContent = `error: ${error.message}`;
      return "";
    }
  }));
  state.chat.answers = answers;
  $("#prefer-left").disabled = $("#prefer-right").disabled = false;
}

async function prefer(side) {
  const [left, right] = state.chat.answers;
  const models = [$("#chat-left").value, $("#chat-right").value];
  const [chosen, rejected, chosenModel, rejectedModel] = side === "left" ? [left, right, ...models] : [right, left, models[1], models[0]];
  // only the judged turn: its question and the two answers (a growing history made DPO pairs too long)
  const judged = [{ role: "user", content: state.chat.user }];
  const result = await api("/api/preferences", { method: "POST", body: { messages: judged, chosen, rejected,
    chosen_model: chosenModel, rejected_model: rejectedModel } });
  state.chat.answers = side === "left" ? [left, right] : [right, left];
  showPreferenceCount(result.pairs);
  $("#prefer-left").disabled = $("#prefer-right").disabled = true;
}

const DPO_PAIRS = 20;  // fewer pairs than this teach a preference run nothing it can measure
function showPreferenceCount(pairs) {
  $("#preference-status").textContent = pairs >= DPO_PAIRS ? `${pairs} preference pairs saved: enough to train`
    : `${pairs} preference pair${pairs === 1 ? "" : "s"} saved; ${DPO_PAIRS - pairs} more needed to train from them`;
  $("#dpo-button").disabled = pairs < DPO_PAIRS;
}

function newConversation() {
  state.chat = null;
  for (const side of ["left", "right"]) $(`#chat-${side}-log`).replaceChildren();
  $("#prefer-left").disabled = $("#prefer-right").disabled = true;
  $("#chat-input").focus();
}

async function trainFromPreferences() {
  const result = await api("/api/guided/recipe", { method: "POST", body: { task: "prefer", data: "data/preferences.jsonl",
    model: $("#chat-left").value.startsWith("runs/") ? undefined : $("#chat-left").value } });
  const saved = await api("/api/recipes", { method: "POST", body: { recipe: result.recipe, name: result.recipe.output.dir.slice(5) } });
  const job = await api("/api/jobs", { method: "POST", body: { kind: "train", recipe: saved.path } });
  watch(job.id);
}

// --- runs and comparison -----------------------------------------------------------------------------

async function refreshRuns() {
  const [{ jobs }, { runs }] = await Promise.all([api("/api/jobs"), api("/api/runs")]);
  const jobRows = jobs.map((job) => [String(job.id), job.kind, job.title, job.status,
    el("span", {}, el("button", { onclick: () => watch(job.id) }, "watch"), " ",
      job.resumable ? el("button", { onclick: async () => { await api(`/api/jobs/${job.id}/resume`, { method: "POST" }); watch(job.id); } }, "resume") : "")]);
  table($("#jobs-table"), ["id", "kind", "job", "status", ""], jobRows);
  table($("#runs-table"), ["compare", "run", "result", "steps", "train loss", "val loss", "method", "trackers"], runs.map((run) => [
    el("input", { type: "checkbox", class: "compare-pick", value: run.path, "aria-label": `compare ${run.name}` }), run.name,
    run.summary ? resultSentence(run.summary) : "",
    run.summary ? String(run.summary.steps) : "(running or stopped)", run.summary ? fmt(run.summary.train_loss) : "",
    run.summary ? fmt(run.summary.val_loss) : "", run.summary ? run.summary.method : "",
    Object.entries(run.trackers || {}).map(([name, where]) => `${name}: ${where}`).join("; ")]));
}

const fmt = (value) => (typeof value !== "number" ? (value == null ? "" : String(value))
  : Number.isInteger(value) ? value.toLocaleString() : value.toFixed(4));

async function compareRuns() {
  const picked = [...document.querySelectorAll(".compare-pick:checked")].map((box) => box.value);
  if (picked.length < 2) return notice("select two or more runs", true);
  const result = await api(`/api/runs/compare?${picked.map((p) => `runs=${encodeURIComponent(p)}`).join("&")}`);
  drawChart($("#compare-chart"), result.runs.map((run) => ({ name: run.name,
    points: run.metrics.filter((m) => m.loss !== undefined).map((m) => [m.step, m.loss]) })));
  const keys = ["steps", "train_loss", "val_loss", "val_perplexity", "tokens_per_s", "wall_time_s", "trainable_parameters", "method"];
  table($("#compare-table"), ["", ...result.runs.map((r) => r.name)],
    [["result (before → after)", ...result.runs.map((r) => resultSentence(r.summary))],
      ...keys.map((key) => [key, ...result.runs.map((r) => fmt(r.summary ? r.summary[key] : null))])]);
  $("#recipe-diff").textContent = result.recipe_diff || "(the recipes are the same)";
}

// --- export ----------------------------------------------------------------------------------------

async function refreshExports() {
  await refreshRunPickers();
  const { files } = await api("/api/files?folder=exports");
  $("#exports-list").replaceChildren(...files.map((f) => el("li", {}, f.path, " ",
    el("a", { href: `/api/download?path=${encodeURIComponent(f.path)}`, download: `${f.name}.zip` }, "download"))));
  runDownloadLink();
}

function runDownloadLink() {
  const run = $("#export-run").value;
  $("#run-download").hidden = !run;
  if (run) {
    $("#run-download").href = `/api/download?path=${encodeURIComponent(run)}`;
    $("#run-download").setAttribute("download", `${run.split("/").pop()}.zip`);
  }
}

function exportFormatChanged() {
  const gguf = $("#export-format").value === "gguf";
  $("#export-quantize").disabled = !gguf;
  $("#export-ollama").disabled = !gguf;
}

async function jobLog(id) {
  return (await api(`/api/jobs/${id}/progress`)).log;
}

async function exportRun() {
  $("#export-status").textContent = "submitting the export job ...";
  const format = $("#export-format").value;
  const body = { kind: "export", run: $("#export-run").value, format };
  if (format === "gguf") Object.assign(body, { quantize: $("#export-quantize").value, ollama: $("#export-ollama").checked });
  const job = await api("/api/jobs", { method: "POST", body });
  $("#export-status").textContent = `job ${job.id} running: ${job.title}`;
  $("#export-report").textContent = "";
  const done = await waitForJob(job.id);
  $("#export-status").textContent = `job ${job.id} ${done.status}: ${done.output}`;
  $("#export-status").dataset.status = done.status;
  if (done.status === "done") {
    const folder = done.output.replace(/\/config\.json$/, "");
    const link = $("#export-download");
    link.href = `/api/download?path=${encodeURIComponent(folder)}`;
    link.setAttribute("download", `${folder.split("/").pop()}.zip`);
    link.hidden = false;
  }
  // the export's own check report (or why it failed): the command's output
  const log = await jobLog(job.id);
  const report = log.split("\n").filter((line) => /^(exported |  \S+: |error: )/.test(line));
  $("#export-report").textContent = report.length ? report.join("\n") : log.slice(-3000);
  await refreshExports();
}

// --- sweep -----------------------------------------------------------------------------------------

async function sweep() {
  const check = await checkRecipe();
  if (!check.valid) return notice("fix the recipe first (Recipe screen): the errors are shown at their fields", true);
  const saved = await api("/api/recipes", { method: "POST", body: { recipe: state.recipe, name: $("#run-name").value } });
  const job = await api("/api/jobs", { method: "POST", body: { kind: "sweep", recipe: saved.path,
    space: $("#sweep-space").value, trials: Number($("#sweep-trials").value), workers: Number($("#sweep-workers").value) } });
  state.sweepJob = job.id;
  $("#sweep-status").textContent = `job ${job.id} ${job.status}: ${job.title}`;
  $("#sweep-trials-table").textContent = "";
  $("#sweep-plot").hidden = true;
  let offset = 0, job_ = job;
  while (!["done", "failed", "stopped", "interrupted", "cancelled"].includes(job_.status)) {
    await new Promise((resolve) => setTimeout(resolve, 700));
    const progress = await api(`/api/jobs/${job.id}/progress?log_offset=${offset}`);
    offset = progress.log_offset;
    job_ = progress.job;
    const lines = progress.log.split("\n").filter((line) => /^(worker \d+: )?(trial |best|study |sweep|error)/.test(line));
    if (lines.length) $("#sweep-log").textContent += lines.join("\n") + "\n";
    $("#sweep-status").textContent = `job ${job.id} ${job_.status}: ${job_.title}`;
  }
  $("#sweep-status").dataset.status = job_.status;
  if (job_.status === "done") {
    const response = await fetch(`/api/files/raw?path=${encodeURIComponent(job_.output)}`);
    $("#sweep-trials-table").textContent = await response.text();
    $("#sweep-plot").src = `/api/files/raw?path=${encodeURIComponent(job_.run_dir + "/sweep.png")}`;
    $("#sweep-plot").hidden = false;
  }
}

// --- wiring ----------------------------------------------------------------------------------------

function on(selector, handler) {
  $(selector).addEventListener("click", (event) => { event.preventDefault(); handler().catch((error) => notice(error.message, true)); });
}

async function start() {
  for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => show(button.dataset.screen));
  on("#upload-button", upload);
  on("#preview-button", () => preview());
  on("#inspect-button", inspect);
  $("#data-file").addEventListener("change", () => preview(true).catch((error) => notice(error.message, true)));
  $("#test-file").addEventListener("change", saveLocation);
  for (const role of ROLES) $(`#col-${role}`).addEventListener("change", () => columnsChanged().catch((error) => notice(error.message, true)));
  on("#try-button", classifyTexts);
  on("#chat-new", async () => newConversation());
  on("#dpo-button", trainFromPreferences);
  $("#chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendChat().catch((error) => notice(error.message, true));
    }
  });
  $("#export-run").addEventListener("change", runDownloadLink);
  for (const button of document.querySelectorAll(".data-step")) on(`.data-step[data-step="${button.dataset.step}"]`, () => dataStep(button.dataset.step));
  on("#use-data-button", async () => {
    state.dataFile = $("#data-file").value;
    state.form.set("data.train", [state.dataFile]);
    if (Object.keys(state.columns).length) state.form.set("data.columns", state.columns);
    show("recipe");
  });
  $("#upload-yaml").addEventListener("change", () => uploadYaml().catch((error) => notice(error.message, true)));
  on("#plan-button", plan);
  on("#train-button", train);
  on("#stop-button", async () => renderTrain(await api(`/api/jobs/${state.job}/stop`, { method: "POST" })));
  on("#resume-button", async () => { await api(`/api/jobs/${state.job}/resume`, { method: "POST" }); watch(state.job); });
  on("#eval-button", evaluate);
  on("#cai-button", cai);
  on("#guided-again", () => guided("practise"));
  $("#cai").addEventListener("toggle", () => { if ($("#cai").open) refreshCai().catch((error) => notice(error.message, true)); });
  $("#guided-preference").addEventListener("change", () => guided("prefer").catch((error) => notice(error.message, true)));
  on("#report-button", openReport);
  on("#chat-send", sendChat);
  on("#prefer-left", () => prefer("left"));
  on("#prefer-right", () => prefer("right"));
  on("#compare-button", compareRuns);
  on("#export-button", exportRun);
  $("#export-format").addEventListener("change", exportFormatChanged);
  on("#sweep-button", sweep);
  on("#sweep-stop-button", async () => { if (state.sweepJob) await api(`/api/jobs/${state.sweepJob}/stop`, { method: "POST" }); });
  await setUpRecipe();
  await restore();
  document.body.dataset.ready = "true";
}

// After a reload: the screen, the data choices and the job of the URL, else the newest training job.
async function restore() {
  const saved = savedLocation();
  for (const role of ROLES) if (saved.get(role)) state.columns[role] = saved.get(role);
  if (saved.get("data")) state.dataFile = saved.get("data");
  await refreshDataFiles(saved.get("data") || undefined, saved.get("test") || undefined);
  if (state.dataFile) await preview().catch(() => {});
  const screen = saved.get("screen") || "data";
  let job = Number(saved.get("job")) || null;
  if (!job && screen === "train") {
    const { jobs } = await api("/api/jobs");
    job = (jobs.find((j) => j.kind === "train") || {}).id || null;
  }
  if (job) {
    watch(job);
    if (screen !== "train") show(screen);
  } else show(screen);
}

start().catch((error) => notice(error.message, true));
