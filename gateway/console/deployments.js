// Deployments: which versions serve a name, the canary's share of the traffic, what each version served
// (requests, errors, latency, time to first token, tokens: the inference service's per-version counters)
// and each served version's training metrics from the registry.

import { api, withEtag } from "./api.js";
import { badge, count, encode, facts, h, link, number, table, when } from "./dom.js";
import { actionForm, field, input, select, values } from "./forms.js";
import { poll } from "./live.js";

// The traffic split as a bar: stable (100 - w)% and canary w%.
function split(deployment) {
  const weight = deployment.canary?.weight ?? 0;
  const bar = h("div", { class: "split-bar", role: "img",
    "aria-label": `stable ${100 - weight}%, canary ${weight}%` });
  const stable = h("span", { class: "stable", "data-weight": 100 - weight }, `v${deployment.stable} ${100 - weight}%`);
  stable.style.flex = `${100 - weight} 1 0`; // basis 0: widths proportional to the weights
  bar.append(stable);
  if (deployment.canary) {
    const canary = h("span", { class: "canary", "data-weight": weight }, `v${deployment.canary.version} ${weight}%`);
    canary.style.flex = `${weight} 1 0`;
    bar.append(canary);
  }
  return bar;
}

function deploymentsTable(deployments) {
  return table([
    ["Name", (d) => link(`#/deployments/${encode(d.name)}`, d.name)],
    ["Model", (d) => link(`#/models/${encode(d.model)}`, d.model)],
    ["State", (d) => badge(d.state)],
    ["Stable", (d) => `v${d.stable}`],
    ["Canary", (d) => (d.canary ? h("span", { class: "canary-weight" }, `v${d.canary.version} at ${d.canary.weight}%`) : "—")],
    ["Traffic", split],
    ["Updated", (d) => when(d.updated_at)],
  ], deployments, { id: "deployments-table", class: "grid", empty: "No deployments yet." });
}

export async function list(_, signal) {
  const load = () => api("/v1/deployments", { signal });
  const first = await load();
  const holder = h("div", {}, deploymentsTable(first.deployments));
  poll(signal, 3000, load, (data) => holder.replaceChildren(deploymentsTable(data.deployments)), { initial: first });
  return h("div", {}, h("h1", {}, "Deployments"), holder, createForm());
}

// A new deployment (If-None-Match: *, so an existing one of that name is never replaced from here).
function createForm() {
  return actionForm({
    id: "deployment-create", title: "New deployment", submit: "Deploy",
    children: h("div", { class: "row" },
      field("Name", input("name", { required: true, maxlength: 63 })),
      field("Model", input("model", { required: true, maxlength: 63 })),
      field("Stable", input("stable", { required: true, placeholder: "version number or alias" }))),
    act: async (form) => {
      const { name, model, stable } = values(form);
      const body = { model, stable: /^\d+$/.test(stable) ? Number(stable) : stable };
      const deployment = await api(`/v1/deployments/${encode(name)}`, { method: "PUT", body, ifNoneMatch: "*" });
      return h("span", {}, "Deploying ", link(`#/deployments/${encode(name)}`, name), ` (${deployment.state})`);
    },
  });
}

// Give the deployment a canary or change its share: PUT of the whole deployment with If-Match, the ETag
// of the deployment as last read (a change made meanwhile elsewhere gets 412 and is not overwritten).
function canaryForm(current, versions) {
  const deployment = () => current.deployment;
  const choices = versions.map((v) => [String(v.version), `v${v.version}`]);
  const start = deployment().canary;
  return actionForm({
    id: "canary-form", title: "Canary", submit: "Apply",
    children: h("div", { class: "row" },
      field("Canary version", select("version", [["", "none"], ...choices], { value: start?.version })),
      field("Weight (%)", input("weight", { type: "number", min: 0, max: 100, value: start?.weight ?? 10 }))),
    act: async (form) => {
      const { version, weight = 0 } = values(form);
      const body = { model: deployment().model, stable: deployment().stable,
        canary: version ? { version: Number(version), weight } : null };
      const changed = await withEtag(`/v1/deployments/${encode(deployment().name)}`,
        { method: "PUT", body, ifMatch: current.etag });
      current.etag = changed.etag || current.etag;
      current.deployment = changed.body;
      return version ? `v${version} now receives ${weight}% of requests` : "canary removed";
    },
  });
}

async function servedVersions(deployment, signal) {
  const served = [{ role: "stable", version: deployment.stable, weight: 100 - (deployment.canary?.weight ?? 0) }];
  if (deployment.canary) served.push({ role: "canary", version: deployment.canary.version, weight: deployment.canary.weight });
  return Promise.all(served.map(async (entry) => {
    try {
      return { ...entry, info: await api(`/v1/models/${encode(deployment.model)}/versions/${entry.version}`, { signal }) };
    } catch (error) {
      return { ...entry, info: null, error };
    }
  }));
}

// The deployment's serving figures (GET /v1/deployments/{name}/metrics); null when they cannot be read.
async function servingFigures(deployment, signal) {
  try {
    return await api(`/v1/deployments/${encode(deployment.name)}/metrics`, { signal });
  } catch (error) {
    if (signal?.aborted) throw error;
    return { error };
  }
}

const milliseconds = (seconds) => (typeof seconds === "number" ? `${number(seconds * 1000, 3)} ms` : "—");
const percent = (fraction) => (typeof fraction === "number" ? `${number(fraction * 100, 3)}%` : "—");

function servingTable(deployment, figures) {
  if (!figures) return null;
  if (figures.error) return h("p", { class: "error" }, `serving metrics unavailable: ${figures.error.message}`);
  return h("div", {},
    table([
      ["Role", (v) => v.role],
      ["Version", (v) => link(`#/models/${encode(v.model)}/versions/${v.version}`,
        v.model === deployment.model ? `v${v.version}` : `${v.model} v${v.version}`)],
      ["Serving", (v) => (v.serving ? `${v.weight}%` : "no longer")],
      ["Requests", (v) => h("span", { class: "requests", "data-value": v.requests }, count(v.requests))],
      ["Errors", (v) => count(v.errors)],
      ["Error rate", (v) => percent(v.requests ? v.error_rate : null)],
      ["Latency p50", (v) => milliseconds(v.latency_p50_s)],
      ["Latency p99", (v) => milliseconds(v.latency_p99_s)],
      ["Latency mean", (v) => milliseconds(v.latency_mean_s)],
      ["First token (mean)", (v) => milliseconds(v.time_to_first_token_mean_s)],
      ["Prompt tokens", (v) => count(v.prompt_tokens)],
      ["Completion tokens", (v) => count(v.completion_tokens)],
    ], figures.versions, { id: "serving-metrics", class: "grid", empty: "Nothing served yet." }),
    h("p", { class: "muted" }, `Counted by inference process ${figures.replica} since ${when(figures.since)}; `
      + "each replica counts the requests it served. Latency quantiles are estimated from histogram buckets."));
}

function detail(deployment, served, figures) {
  const metricNames = [...new Set(served.flatMap((s) => Object.keys(s.info?.metrics ?? {})))].sort();
  return h("div", {},
    h("h1", {}, `Deployment ${deployment.name} `, badge(deployment.state)),
    deployment.message ? h("p", { class: "error" }, deployment.message) : null,
    facts([
      ["Model", link(`#/models/${encode(deployment.model)}`, deployment.model)],
      ["Stable", `v${deployment.stable}`],
      ["Canary", deployment.canary ? h("span", { id: "canary-weight", "data-weight": deployment.canary.weight },
        `v${deployment.canary.version} receives ${deployment.canary.weight}% of requests`) : "none"],
      ["Created", when(deployment.created_at)], ["Updated", when(deployment.updated_at)],
    ]),
    h("h2", {}, "Traffic"), split(deployment),
    h("h2", {}, "Serving"), servingTable(deployment, figures),
    h("h2", {}, "Served versions (training metrics from the registry)"),
    table([
      ["Role", (s) => s.role],
      ["Version", (s) => link(`#/models/${encode(deployment.model)}/versions/${s.version}`, `v${s.version}`)],
      ["Traffic", (s) => `${s.weight}%`],
      ["Triton model", (s) => h("code", {}, deployment.triton_models?.[String(s.version)] ?? "—")],
      ...metricNames.map((name) => [name, (s) => number(s.info?.metrics?.[name])]),
      ["Digest", (s) => h("code", { class: "digest" }, s.info?.digest?.slice(0, 16) ?? s.error?.message ?? "—")],
    ], served, { id: "served-versions", class: "grid" }));
}

export async function show([name], signal) {
  const current = { deployment: null, etag: "" }; // as last read: what the canary form changes
  const load = async () => {
    const { body: deployment, etag } = await withEtag(`/v1/deployments/${encode(name)}`, { signal });
    Object.assign(current, { deployment, etag });
    return { deployment, figures: await servingFigures(deployment, signal) };
  };
  const first = await load();
  const draw = async ({ deployment, figures }) => detail(deployment, await servedVersions(deployment, signal), figures);
  const holder = h("div", {}, await draw(first));
  poll(signal, 3000, load, async (data) => holder.replaceChildren(await draw(data)), { initial: first });
  const { versions } = await api(`/v1/models/${encode(first.deployment.model)}`, { signal })
    .catch(() => ({ versions: [] }));
  return h("div", {}, h("p", {}, link("#/deployments", "← Deployments"), " · ",
    link(`#/playground/${encode(name)}`, "Chat with it")), holder, canaryForm(current, versions));
}
