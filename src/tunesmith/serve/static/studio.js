// The studio: nine screens, each a client of the server's HTTP API (/api and /v1).

import { $, api, bubble, el, notice, streamChat, table } from "./dom.js";
import { drawChart } from "./chart.js";
import { RecipeForm } from "./form.js";

const state = { dataFile: null, form: null, recipe: {}, job: null, poll: null, metrics: [], logOffset: 0, chat: null };

// --- navigation ------------------------------------------------------------------------------------

function show(screen) {
  notice("");
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.screen === screen);
  for (const section of document.querySelectorAll(".screen")) section.classList.toggle("active", section.id === `screen-${screen}`);
  const refresh = { data: refreshDataFiles, runs: refreshRuns, chat: refreshChatModels, evaluate: refreshRunPickers,
    export: refreshExports };
  if (refresh[screen]) refresh[screen]();
}

// --- data ------------------------------------------------------------------------------------------

async function refreshDataFiles(selected) {
  const { files } = await api("/api/files?folder=data");
  const select = $("#data-file");
  const current = selected || select.value || state.dataFile;
  select.replaceChildren(...files.filter((f) => !f.folder).map((f) =>
    el("option", { value: f.path, selected: f.path === current }, `${f.name} (${f.size} bytes)`)));
}

async function upload() {
  const file = $("#upload-file").files[0];
  if (!file) return notice("choose a file first", true);
  const body = new FormData();
  body.append("file", file);
  const result = await api("/api/upload", { method: "POST", raw: body });
  state.dataFile = result.path;
  notice(`uploaded ${file.name} as ${result.path}`);
  await refreshDataFiles(result.path);
  await preview();
}

function cellText(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

async function preview() {
  const path = $("#data-file").value;
  if (!path) return;
  state.dataFile = path;
  const result = await api(`/api/data/preview?path=${encodeURIComponent(path)}&limit=20`);
  $("#data-format").textContent = `format: ${result.format}; first ${result.rows.length} records`;
  const columns = [...new Set(result.rows.flatMap((row) => Object.keys(row)))];
  table($("#preview-table"), columns, result.rows.map((row) => columns.map((c) => cellText(row[c] ?? ""))));
  $("#preview-bubbles").replaceChildren(...result.examples.slice(0, 6).flatMap((example) => [
    ...(example.messages || []).map((m) => bubble(m.role, m.content)),
    ...(example.text ? [bubble("assistant", example.text)] : []),
    ...(example.error ? [el("p", { class: "error" }, example.error)] : []),
    el("hr"),
  ]));
}

async function inspect() {
  const path = $("#data-file").value;
  const report = await api("/api/data/inspect", { method: "POST", body: { path } });
  $("#inspect-report").textContent = `${report.records} records, exact duplicates ${report.exact_duplicates}, ` +
    `near duplicates ${report.near_duplicates}, empty ${report.empty}\nlength: ${JSON.stringify(report.length)}\n${report.verdict}`;
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
  $("#recipe-yaml").textContent = result.yaml;
  const link = $("#download-yaml");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([result.yaml], { type: "text/yaml" }));
  const unplaced = state.form.showErrors(result.errors);
  $("#recipe-errors").textContent = unplaced.map((e) => `${e.loc}: ${e.message}`).join("; ");
  $("#recipe-form").dataset.valid = String(result.valid);
  return result;
}

function starterRecipe(model) {
  const name = $("#run-name").value || "studio-run";
  return {
    model: { name: model },
    data: { train: state.dataFile ? [state.dataFile] : [], max_length: 128, template: "simple", validation_fraction: 0.1 },
    method: { kind: "lora", r: 4, alpha: 8 },
    train: { max_steps: 30, batch_size: 4, lr: 0.001, log_every: 1, checkpoint_every: 5 },
    output: { dir: `runs/${name}` },
  };
}

async function setUpRecipe() {
  const [schema, { models }] = await Promise.all([api("/api/recipe/schema"), api("/api/recipe/models")]);
  const picker = $("#model-picker");
  picker.replaceChildren(...models.map((m) => el("option", { value: m.id }, `${m.id} (${m.kind})`)));
  const preferred = models.find((m) => m.kind !== "alias") || models[0];
  if (preferred) picker.value = preferred.id;
  state.form = new RecipeForm($("#recipe-form"), schema, recipeChanged);
  state.form.render(starterRecipe(picker.value));
  picker.addEventListener("change", () => state.form.set("model.name", picker.value));
  $("#run-name").addEventListener("input", () => state.form.set("output.dir", `runs/${$("#run-name").value}`));
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
  const rows = [["model", result.model], ["method", result.method], ["base model parameters", result.base_parameters.toLocaleString()],
    ["parameters with the method", result.total_parameters.toLocaleString()],
    ["trainable", `${result.trainable_parameters.toLocaleString()} (${(100 * result.trainable_share).toFixed(3)}%)`],
    ["weights + gradients + Adam", `${result.weights_and_optimizer_mb} MB`], ["steps", result.max_steps ?? "epochs"],
    ["batch size", result.batch_size], ["max length", result.max_length], ["not yet known", result.note]];
  table($("#plan-table"), ["", ""], rows);
  show("plan");
}

async function train() {
  const check = await checkRecipe();
  if (!check.valid) return notice("fix the recipe first: the errors are shown at their fields", true);
  const saved = await api("/api/recipes", { method: "POST", body: { recipe: state.recipe, name: $("#run-name").value } });
  const job = await api("/api/jobs", { method: "POST", body: { kind: "train", recipe: saved.path } });
  notice(`job ${job.id} queued: ${job.title} (recipe ${saved.path})`);
  watch(job.id, state.recipe.train && state.recipe.train.max_steps);
}

// --- train (live) ------------------------------------------------------------------------------------

function watch(jobId, totalSteps = null) {
  clearInterval(state.poll);
  state.totalSteps = totalSteps;
  state.job = jobId;
  state.metrics = [];
  state.logOffset = 0;
  state.metricsOffset = 0;
  $("#train-log").textContent = "";
  $("#train-job").textContent = `job ${jobId}: starting`;
  $("#train-job").dataset.status = "";
  $("#train-chart").dataset.points = "0";
  show("train");
  const tick = async () => {
    const update = await api(`/api/jobs/${jobId}/progress?log_offset=${state.logOffset}&metrics_offset=${state.metricsOffset}`);
    state.logOffset = update.log_offset;
    state.metricsOffset = update.metrics_offset;
    if (update.metrics_offset < state.metrics.length) state.metrics = [];  // resumed: the file was rewound
    state.metrics.push(...update.metrics);
    const log = $("#train-log");
    log.textContent += update.log;
    log.scrollTop = log.scrollHeight;
    renderTrain(update.job);
    if (!["queued", "running"].includes(update.job.status)) clearInterval(state.poll);
  };
  tick();
  state.poll = setInterval(tick, 1000);
}

function renderTrain(job) {
  $("#train-job").textContent = `job ${job.id} (${job.title}): ${job.status}`;
  $("#train-job").dataset.status = job.status;
  $("#stop-button").disabled = !["queued", "running"].includes(job.status);
  $("#resume-button").disabled = !job.resumable;
  const steps = state.metrics.filter((m) => m.loss !== undefined);
  const validation = state.metrics.filter((m) => m.val_loss !== undefined);
  drawChart($("#train-chart"), [
    { name: "train loss", points: steps.map((m) => [m.step, m.loss]) },
    { name: "validation loss", points: validation.map((m) => [m.step, m.val_loss]) },
  ]);
  $("#train-chart").dataset.points = String(steps.length);
  const last = steps[steps.length - 1];
  if (last && job.started) {
    const elapsed = (job.finished || Date.now() / 1000) - job.started;
    const total = state.totalSteps;
    $("#train-stats").textContent = `step ${last.step}, loss ${last.loss.toFixed(4)}, ${Math.round(last.tokens_per_s)} tokens/s, ` +
      `${last.tokens} tokens, elapsed ${elapsed.toFixed(0)} s` + (total ? `, ETA ${((elapsed / last.step) * (total - last.step)).toFixed(0)} s` : "");
  }
}

// --- evaluate --------------------------------------------------------------------------------------

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
  const job = await api("/api/jobs", { method: "POST", body: { kind: "eval", run, limit: 8 } });
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
  const messages = [...history, { role: "user", content: text }];
  state.chat = { history, user: text, messages, answers: null };
  const sides = ["left", "right"];
  for (const side of sides) $(`#chat-${side}-log`).append(bubble("user", text));
  $("#prefer-left").disabled = $("#prefer-right").disabled = true;
  const answers = await Promise.all(sides.map(async (side) => {
    const reply = bubble("assistant", "");
    $(`#chat-${side}-log`).append(reply);
    try {
      return await streamChat({ model: $(`#chat-${side}`).value, messages, max_tokens: 48, temperature: 0 },
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
  const result = await api("/api/preferences", { method: "POST", body: { messages: state.chat.messages, chosen, rejected,
    chosen_model: chosenModel, rejected_model: rejectedModel } });
  state.chat.answers = side === "left" ? [left, right] : [right, left];
  $("#preference-status").textContent = `saved: ${result.pairs} pairs in ${result.path}`;
  $("#prefer-left").disabled = $("#prefer-right").disabled = true;
}

// --- runs and comparison -----------------------------------------------------------------------------

async function refreshRuns() {
  const [{ jobs }, { runs }] = await Promise.all([api("/api/jobs"), api("/api/runs")]);
  const jobRows = jobs.map((job) => [String(job.id), job.kind, job.title, job.status,
    el("span", {}, el("button", { onclick: () => watch(job.id) }, "watch"), " ",
      job.resumable ? el("button", { onclick: async () => { await api(`/api/jobs/${job.id}/resume`, { method: "POST" }); watch(job.id); } }, "resume") : "")]);
  table($("#jobs-table"), ["id", "kind", "job", "status", ""], jobRows);
  table($("#runs-table"), ["compare", "run", "steps", "train loss", "val loss", "method"], runs.map((run) => [
    el("input", { type: "checkbox", class: "compare-pick", value: run.path }), run.name,
    run.summary ? String(run.summary.steps) : "(running or stopped)", run.summary ? fmt(run.summary.train_loss) : "",
    run.summary ? fmt(run.summary.val_loss) : "", run.summary ? run.summary.method : ""]));
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
    keys.map((key) => [key, ...result.runs.map((r) => fmt(r.summary ? r.summary[key] : null))]));
  $("#recipe-diff").textContent = result.recipe_diff || "(the recipes are the same)";
}

// --- export ----------------------------------------------------------------------------------------

async function refreshExports() {
  await refreshRunPickers();
  const { files } = await api("/api/files?folder=exports");
  $("#exports-list").replaceChildren(...files.map((f) => el("li", {}, f.path)));
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
    space: $("#sweep-space").value, trials: Number($("#sweep-trials").value) } });
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
    const lines = progress.log.split("\n").filter((line) => /^(trial |best|study |sweep|error)/.test(line));
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
  on("#preview-button", preview);
  on("#inspect-button", inspect);
  for (const button of document.querySelectorAll(".data-step")) on(`.data-step[data-step="${button.dataset.step}"]`, () => dataStep(button.dataset.step));
  on("#use-data-button", async () => { state.dataFile = $("#data-file").value; state.form.set("data.train", [state.dataFile]); show("recipe"); });
  $("#upload-yaml").addEventListener("change", () => uploadYaml().catch((error) => notice(error.message, true)));
  on("#plan-button", plan);
  on("#train-button", train);
  on("#stop-button", async () => renderTrain(await api(`/api/jobs/${state.job}/stop`, { method: "POST" })));
  on("#resume-button", async () => { await api(`/api/jobs/${state.job}/resume`, { method: "POST" }); watch(state.job); });
  on("#eval-button", evaluate);
  on("#report-button", openReport);
  on("#chat-send", sendChat);
  on("#prefer-left", () => prefer("left"));
  on("#prefer-right", () => prefer("right"));
  on("#compare-button", compareRuns);
  on("#export-button", exportRun);
  $("#export-format").addEventListener("change", exportFormatChanged);
  on("#sweep-button", sweep);
  on("#sweep-stop-button", async () => { if (state.sweepJob) await api(`/api/jobs/${state.sweepJob}/stop`, { method: "POST" }); });
  show("data");
  await setUpRecipe();
  document.body.dataset.ready = "true";
}

start().catch((error) => notice(error.message, true));
