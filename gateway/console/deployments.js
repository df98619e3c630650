// Deployments: which versions serve a name, the canary's share of the traffic, and each served
// version's metrics from the registry.

import { api } from "./api.js";
import { badge, encode, facts, h, link, number, table, when } from "./dom.js";
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
  return h("div", {}, h("h1", {}, "Deployments"), holder);
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

function detail(deployment, served) {
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
    h("h2", {}, "Served versions"),
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
  const load = () => api(`/v1/deployments/${encode(name)}`, { signal });
  const first = await load();
  const holder = h("div", {}, detail(first, await servedVersions(first, signal)));
  poll(signal, 3000, load, async (data) => holder.replaceChildren(detail(data, await servedVersions(data, signal))),
    { initial: first });
  return h("div", {}, h("p", {}, link("#/deployments", "← Deployments")), holder);
}
