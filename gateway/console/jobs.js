// Training jobs: the list with progress, and one job with its loss curves, live from the event stream.

import { api, events } from "./api.js";
import { badge, count, encode, facts, h, link, number, progressBar, shortId, table, when } from "./dom.js";
import { actionForm, field, input, select, values } from "./forms.js";
import { poll, sleep } from "./live.js";
import { lineChart } from "./plot.js";

const FINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const latest = (job, name) => job.latest_metrics?.values?.[name];

function jobsTable(jobs) {
  return table([
    ["Job", (j) => link(`#/jobs/${encode(j.id)}`, shortId(j.id))],
    ["State", (j) => badge(j.state)],
    ["Progress", (j) => progressBar(j.progress?.done, j.progress?.total)],
    ["Dataset", (j) => `${j.spec?.dataset?.name} v${j.spec?.dataset?.version}`],
    ["Model", (j) => `${j.spec?.model?.family} ${j.spec?.model?.n_layer}×${j.spec?.model?.n_embd}`],
    ["Train loss", (j) => number(latest(j, "train_loss"))],
    ["Validation loss", (j) => number(latest(j, "validation_loss"))],
    ["Registered", (j) => (j.model_version ? link(`#/models/${encode(j.model_version.name)}/versions/${j.model_version.version}`,
      `${j.model_version.name} v${j.model_version.version}`) : "—")],
    ["Submitted", (j) => when(j.created_at)],
  ], jobs, { id: "jobs-table", class: "grid", empty: "No training jobs yet." });
}

export async function list(_, signal) {
  const load = () => api("/v1/training-jobs?page_size=100", { signal });
  const first = await load();
  const holder = h("div", {}, jobsTable(first.jobs));
  poll(signal, 3000, load, (data) => holder.replaceChildren(jobsTable(data.jobs)), { initial: first });
  return h("div", {}, h("h1", {}, "Training jobs"), await submitForm(signal), holder);
}

const numberInput = (name, value, attributes = {}) => input(name, { type: "number", value, required: true, ...attributes });

// The body of POST /v1/training-jobs from the form's fields (`group.field` names say where each goes).
export function jobSpec(fields) {
  const spec = { dataset: {}, model: {}, hyperparameters: {}, distributed: { mode: "ddp", nproc_per_node: 1, nnodes: 1 } };
  for (const [name, value] of Object.entries(fields)) {
    const [group, key] = name.split(".");
    if (group === "dataset" && key === "ref") {
      const [dataset, version] = value.split("@");
      spec.dataset = { name: dataset, version: Number(version) };
    } else if (group === "init") {
      const [model, version] = value.split("@");
      spec.model.init_from = { name: model, version: Number(version) };
    } else if (group === "adapter") { // LoRA and the like: only with a starting version
      spec.model.adapter = { ...spec.model.adapter, [key]: value };
    } else if (group === "model_name") {
      spec.model_name = value;
    } else {
      spec[group][key] = value;
    }
  }
  return spec;
}

// Submit a job: a dataset version, the model's family and sizes (or a registered version to start from),
// and the usual hyper-parameters; the rest takes the training service's defaults.
async function submitForm(signal) {
  const [{ datasets }, { models }] = await Promise.all([
    api("/v1/datasets?page_size=200", { signal }).catch(() => ({ datasets: [] })),
    api("/v1/models?page_size=200", { signal }).catch(() => ({ models: [] })),
  ]);
  const ready = datasets.filter((d) => d.latest?.state === "READY")
    .map((d) => [`${d.name}@${d.latest.version}`, `${d.name} v${d.latest.version}`]);
  const starts = [["", "scratch (random weights)"],
    ...models.filter((m) => m.latest_version).map((m) => [`${m.name}@${m.latest_version}`, `${m.name} v${m.latest_version}`])];
  return actionForm({
    id: "job-submit", title: "Submit a training job", submit: "Submit job",
    children: [
      h("div", { class: "row" },
        field("Dataset", select("dataset.ref", ready, { required: true })),
        field("Start from", select("init.ref", starts), "fine-tune a registered version: its architecture wins over the sizes below"),
        field("Family", select("model.family", ["gpt2", "bert", "t5"])),
        field("Register as", input("model_name.", { placeholder: "the dataset's name" }))),
      h("div", { class: "row" },
        field("Adapter", select("adapter.type", [["", "none (all weights)"], ["lora", "LoRA"]]),
          "with a starting version: train a LoRA adapter, register merged weights plus adapter/"),
        field("LoRA rank", input("adapter.r", { type: "number", min: 1, placeholder: "default" })),
        field("LoRA alpha", input("adapter.alpha", { type: "number", min: 0, step: "any", placeholder: "default" }))),
      h("div", { class: "row" },
        field("Layers", numberInput("model.n_layer", 2, { min: 1 })),
        field("Heads", numberInput("model.n_head", 4, { min: 1 })),
        field("Width", numberInput("model.n_embd", 128, { min: 1 })),
        field("Context", numberInput("model.block_size", 128, { min: 2 }))),
      h("div", { class: "row" },
        field("Steps", numberInput("hyperparameters.max_steps", 200, { min: 1 })),
        field("Batch size", numberInput("hyperparameters.batch_size", 16, { min: 1 })),
        field("Learning rate", numberInput("hyperparameters.learning_rate", 0.001, { step: "any", min: 0 })),
        field("Warm-up steps", input("hyperparameters.warmup_steps", { type: "number", min: 0, placeholder: "default" })),
        field("Evaluate every", input("hyperparameters.eval_interval", { type: "number", min: 1, placeholder: "default" }),
          "steps"),
        field("Seed", input("hyperparameters.seed", { type: "number", min: 0, placeholder: "random" })),
        field("Precision", select("hyperparameters.precision", ["fp32", "bf16"]))),
    ],
    act: async (form) => {
      const spec = jobSpec(values(form));
      const job = await api("/v1/training-jobs", { method: "POST", body: spec });
      return h("span", {}, "Submitted ", link(`#/jobs/${encode(job.id)}`, `job ${shortId(job.id)}`), ` (${job.state})`);
    },
  });
}

// The job's metric series keyed by step, so replayed and live events never draw a point twice.
class Curves {
  static NAMES = ["train_loss", "validation_loss", "learning_rate", "tokens_per_second"];

  constructor(metrics) {
    this.series = Object.fromEntries(Curves.NAMES.map((name) => [name, new Map()]));
    for (const name of Curves.NAMES) {
      for (const point of metrics[name] ?? []) this.series[name].set(point.step, point.value);
    }
  }

  record(step, values) {
    for (const [name, value] of Object.entries(values ?? {})) this.series[name]?.set(step, value);
  }

  points(name) {
    return [...this.series[name]].map(([step, value]) => ({ step, value }));
  }
}

function summary(job) {
  const spec = job.spec ?? {}, model = spec.model ?? {}, hp = spec.hyperparameters ?? {}, dist = spec.distributed ?? {};
  return facts([
    ["State", badge(job.state)],
    ["Progress", progressBar(job.progress?.done, job.progress?.total)],
    ["Dataset", link(`#/datasets/${encode(spec.dataset?.name ?? "")}`, `${spec.dataset?.name} v${spec.dataset?.version}`)],
    ["Model", `${model.family}: ${model.n_layer} layers, ${model.n_head} heads, width ${model.n_embd}, context ${model.block_size}`],
    ["Optimisation", `${count(hp.max_steps)} steps, batch ${hp.batch_size}×${hp.grad_accum}, lr ${number(hp.learning_rate)} → ${number(hp.min_learning_rate)}, ${hp.precision}`],
    ["Distributed", `${dist.mode}, ${dist.nnodes} node(s) × ${dist.nproc_per_node} process(es)`],
    ["Attempt", job.attempt],
    ["Registered", job.model_version ? link(`#/models/${encode(job.model_version.name)}/versions/${job.model_version.version}`,
      `${job.model_version.name} v${job.model_version.version}`) : ""],
    ["Error", job.error ? h("span", { class: "error" }, job.error) : ""],
    ["Submitted", when(job.created_at)], ["Started", when(job.started_at)], ["Finished", when(job.finished_at)],
  ], { id: "job-summary" });
}

function charts(curves) {
  return [
    h("figure", { id: "loss-chart" }, h("figcaption", {}, "Loss"),
      lineChart([{ name: "train_loss", points: curves.points("train_loss") },
        { name: "validation_loss", points: curves.points("validation_loss") }], { title: "Loss" })),
    h("div", { class: "pair" },
      h("figure", { id: "lr-chart" }, h("figcaption", {}, "Learning rate"),
        lineChart([{ name: "learning_rate", points: curves.points("learning_rate") }], { height: 180 })),
      h("figure", { id: "throughput-chart" }, h("figcaption", {}, "Tokens per second"),
        lineChart([{ name: "tokens_per_second", points: curves.points("tokens_per_second") }], { height: 180 }))),
  ];
}

function finalMetrics(metrics) {
  const rows = Object.entries(metrics.final ?? {}).sort();
  if (!rows.length) return null;
  return h("section", {}, h("h2", {}, "Final metrics"),
    table([["Metric", ([name]) => name], ["Value", ([, value]) => number(value)]], rows, { id: "final-metrics" }));
}

export async function show([id], signal) {
  const path = `/v1/training-jobs/${encode(id)}`;
  let [job, metrics] = await Promise.all([api(path, { signal }), api(`${path}/metrics`, { signal })]);
  const curves = new Curves(metrics);
  const head = h("div", {}, summary(job));
  const plots = h("div", { class: "charts" }, charts(curves));
  const tail = h("div", {}, finalMetrics(metrics));
  const cancel = h("button", {
    type: "button", class: "danger", hidden: FINAL.has(job.state),
    onclick: async () => { cancel.disabled = true; await api(path, { method: "DELETE" }).catch(() => {}); },
  }, "Cancel job");

  const draw = () => plots.replaceChildren(...charts(curves));
  let pending = false;
  const redraw = () => { // at most one redraw per frame, however fast events arrive
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  };
  const refresh = async () => {
    [job, metrics] = await Promise.all([api(path, { signal }), api(`${path}/metrics`, { signal })]);
    for (const name of Curves.NAMES) for (const p of metrics[name] ?? []) curves.series[name].set(p.step, p.value);
    head.replaceChildren(summary(job));
    tail.replaceChildren(finalMetrics(metrics) ?? "");
    cancel.hidden = FINAL.has(job.state);
    draw(); // now rather than at the next frame, so the page never shows a final state beside a stale chart
  };

  (async () => { // follow the job live until it ends or the user leaves
    while (!signal.aborted && !FINAL.has(job.state)) {
      try {
        for await (const event of events(`${path}/events`, { signal })) {
          const data = event.data;
          if (data.metrics) { curves.record(data.metrics.step, data.metrics.values); redraw(); }
          if (data.progress) { job.progress = data.progress; head.replaceChildren(summary(job)); }
          if (data.state_changed) { await refresh(); }
        }
        await refresh(); // the stream ends after the final state
      } catch (error) {
        if (signal.aborted || error.status === 401 || error.status === 404) return;
        await sleep(2000, signal); // the gateway or the service restarted: reconnect
      }
    }
  })();

  return h("div", { id: "job", "data-job-id": id },
    h("p", {}, link("#/jobs", "← Training jobs")),
    h("h1", {}, `Job ${shortId(id)} `, cancel),
    head, plots, tail);
}
