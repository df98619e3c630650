// The registry: models with their aliases and the aliases' history, versions with lineage,
// metrics, artifacts with SHA-256 and exports with their parity reports.

import { api, withEtag } from "./api.js";
import { badge, bytes, count, encode, errorBox, facts, h, link, number, shortId, table, when } from "./dom.js";
import { actionForm, field, input, select, values } from "./forms.js";
import { lineChart } from "./plot.js";

const versionLink = (name, version) => link(`#/models/${encode(name)}/versions/${version}`, `v${version}`);

export async function list(_, signal) {
  const { models } = await api("/v1/models?page_size=200", { signal });
  return h("div", {}, h("h1", {}, "Models"), table([
    ["Name", (m) => link(`#/models/${encode(m.name)}`, m.name)],
    ["Latest", (m) => (m.latest_version ? versionLink(m.name, m.latest_version) : "—")],
    ["Versions", (m) => m.version_count],
    ["Aliases", (m) => m.aliases.map((a) => `${a.alias} → v${a.version}`).join(", ") || "—"],
    ["Created", (m) => when(m.created_at)],
  ], models, { id: "models-table", class: "grid", empty: "No models registered yet." }));
}

function lineageCells(lineage = {}) {
  const dataset = lineage.dataset?.name
    ? link(`#/datasets/${encode(lineage.dataset.name)}`, `${lineage.dataset.name} v${lineage.dataset.version}`) : "—";
  const job = lineage.training_job_id ? link(`#/jobs/${encode(lineage.training_job_id)}`, shortId(lineage.training_job_id)) : "—";
  return { dataset, job };
}

// The view again, from the API, once the user had a moment to read what the form says was done.
const redraw = () => setTimeout(() => window.dispatchEvent(new HashChangeEvent("hashchange")), 1500);

const versionChoices = (versions, current) => versions.filter((v) => v.version !== current)
  .map((v) => [String(v.version), `v${v.version}`]);

// Move an alias: PUT with If-Match carrying the ETag the alias had when this page read it, so a move made
// meanwhile by someone else is refused (412) rather than silently undone.
function moveForm(name, alias, etag, versions) {
  return actionForm({
    id: `move-${alias.alias}`, submit: "Move",
    children: h("div", { class: "row" },
      field("Move to", select("version", versionChoices(versions, alias.version), { required: true })),
      field("Reason", input("reason", { maxlength: 500, placeholder: "why (kept in the history)" }))),
    act: async (form) => {
      const { version, reason = "" } = values(form);
      await api(`/v1/models/${encode(name)}/aliases/${encode(alias.alias)}`,
        { method: "PUT", body: { version: Number(version), reason }, ifMatch: etag });
      redraw();
      return `${alias.alias} → v${version}`;
    },
  });
}

function newAliasForm(name, versions) {
  return actionForm({
    id: "alias-create", title: "New alias", submit: "Create alias",
    children: h("div", { class: "row" },
      field("Alias", input("alias", { required: true, maxlength: 63 })),
      field("Version", select("version", versionChoices(versions), { required: true })),
      field("Reason", input("reason", { maxlength: 500 }))),
    act: async (form) => {
      const { alias, version, reason = "" } = values(form);
      await api(`/v1/models/${encode(name)}/aliases/${encode(alias)}`,
        { method: "PUT", body: { version: Number(version), reason }, ifNoneMatch: "*" });
      redraw();
      return `${alias} → v${version}`;
    },
  });
}

function aliasSection(name, alias, history, etag, versions) {
  return h("section", { class: "card alias", "data-alias": alias.alias },
    h("h3", {}, `${alias.alias} → `, versionLink(name, alias.version)),
    h("p", { class: "muted" }, `moved ${when(alias.updated_at)} by ${alias.updated_by || "—"}`),
    moveForm(name, alias, etag, versions),
    table([
      ["#", (e) => e.sequence],
      ["From", (e) => (e.from_version ? `v${e.from_version}` : "(created)")],
      ["To", (e) => `v${e.to_version}`],
      ["Who", (e) => e.actor || "—"],
      ["Why", (e) => e.reason || "—"],
      ["When", (e) => when(e.at)],
    ], history, { class: "alias-history", empty: "No moves recorded." }));
}

// -- evaluations ------------------------------------------------------------------------------------
// Figures come from the training service; without it the registry's pages still show, saying so here.

async function evaluationsOf(query, signal) {
  try {
    const { evaluations } = await api(`/v1/evaluations?${query}&page_size=100`, { signal });
    return { evaluations };
  } catch (error) {
    if (error?.name === "AbortError") throw error;
    return { evaluations: [], error };
  }
}

const onData = (e) => `${e.dataset.name} v${e.dataset.version} (${e.split})`;
const share = (c) => (c && typeof c.share === "number" ? `${number(c.share * 100, 3)} % of ${count(c.documents)}` : "—");

function evaluationTable(evaluations, { withVersion = false, id }) {
  return table([
    ...(withVersion ? [["Version", (e) => `v${e.model.version}`]] : []),
    ["Evaluation", (e) => h("code", { title: e.id }, shortId(e.id))],
    ["Data", (e) => link(`#/datasets/${encode(e.dataset.name)}`, onData(e))],
    ["State", (e) => badge(e.state)],
    ["Loss", (e) => number(e.metrics.loss)],
    ["Perplexity", (e) => number(e.metrics.perplexity)],
    ["Token accuracy", (e) => number(e.metrics.token_accuracy)],
    ["Calibration error", (e) => number(e.metrics.expected_calibration_error)],
    ["Tokens", (e) => count(e.metrics.tokens)],
    ["Contaminated", (e) => share(e.contamination)],
    ["Loss without them", (e) => number(e.contamination?.clean_metrics?.loss)],
    ["Figures", (e) => (e.exclude_contaminated ? "without contaminated" : "all documents")],
    ["Finished", (e) => when(e.finished_at)],
  ], evaluations, { id, class: "grid evaluations", empty: "No evaluation yet." });
}

// Versions side by side: per dataset and split, the loss of each version's latest finished evaluation.
function comparison(evaluations) {
  const latest = new Map();
  for (const e of evaluations) {
    if (e.state !== "SUCCEEDED" || typeof e.metrics.loss !== "number") continue;
    const key = `${onData(e)}|${e.model.version}`;
    const seen = latest.get(key);
    if (!seen || (e.finished_at ?? "") > (seen.finished_at ?? "")) latest.set(key, e);
  }
  const series = new Map();
  for (const e of latest.values()) {
    const name = onData(e);
    if (!series.has(name)) series.set(name, []);
    series.get(name).push({ step: Number(e.model.version), value: e.metrics.loss });
  }
  return [...series].map(([name, points]) => ({ name, points }));
}

function evaluationSection(found, { withVersion, id, chart = false }) {
  if (found.error) {
    return h("section", { id }, h("h2", {}, "Evaluations"), errorBox(found.error));
  }
  const series = chart ? comparison(found.evaluations) : [];
  return h("section", { id }, h("h2", {}, "Evaluations"),
    series.length ? h("div", { class: "charts", id: `${id}-chart` },
      lineChart(series, { title: "Evaluation loss by version", xLabel: "version", height: 220 })) : null,
    evaluationTable(found.evaluations, { withVersion, id: `${id}-table` }));
}

export async function show([name], signal) {
  const model = await api(`/v1/models/${encode(name)}`, { signal });
  const histories = await Promise.all(model.aliases.map((alias) =>
    api(`/v1/models/${encode(name)}/aliases/${encode(alias.alias)}/history`, { signal })));
  const etags = await Promise.all(model.aliases.map(async (alias) =>
    (await withEtag(`/v1/models/${encode(name)}/aliases/${encode(alias.alias)}`, { signal })).etag));
  const evaluated = await evaluationsOf(`model=${encode(name)}`, signal);
  return h("div", {},
    h("p", {}, link("#/models", "← Models")),
    h("h1", {}, `Model ${name}`),
    h("h2", {}, "Versions"),
    table([
      ["Version", (v) => versionLink(name, v.version)],
      ["State", (v) => badge(v.state)],
      ["Dataset", (v) => lineageCells(v.lineage).dataset],
      ["Job", (v) => lineageCells(v.lineage).job],
      ["Validation loss", (v) => number(v.metrics?.validation_loss ?? v.metrics?.best_validation_loss)],
      ["Aliases", (v) => v.aliases.join(", ") || "—"],
      ["Deployments", (v) => v.deployments.join(", ") || "—"],
      ["Exports", (v) => v.exports.map((e) => `${e.format} ${e.state}`).join(", ") || "—"],
      ["Registered", (v) => when(v.created_at)],
    ], model.versions, { id: "model-versions", class: "grid" }),
    h("h2", {}, "Aliases"),
    model.aliases.length
      ? h("div", { id: "aliases" },
        model.aliases.map((alias, i) => aliasSection(name, alias, histories[i].entries, etags[i], model.versions)))
      : h("p", { class: "empty" }, "No aliases."),
    newAliasForm(name, model.versions),
    evaluationSection(evaluated, { withVersion: true, id: "model-evaluations", chart: true }));
}

function parity(report) {
  if (!report) return "—";
  const verdict = report.passed ? "passed" : "failed";
  return `${verdict} (max |Δlogit| ${number(report.max_abs_logit_diff)} ≤ ${number(report.threshold)})`;
}

export async function version([name, number_], signal) {
  const v = await api(`/v1/models/${encode(name)}/versions/${number_}`, { signal });
  const evaluated = await evaluationsOf(`model=${encode(name)}&version=${encode(number_)}`, signal);
  const lineage = v.lineage ?? {};
  const cells = lineageCells(lineage);
  const environment = Object.entries(lineage.environment ?? {}).sort();
  return h("div", {},
    h("p", {}, link(`#/models/${encode(name)}`, `← Model ${name}`)),
    h("h1", {}, `${name} v${v.version} `, badge(v.state)),
    facts([
      ["Digest", h("code", {}, v.digest)], ["Prefix", h("code", {}, v.prefix)],
      ["Registered by", v.created_by], ["Registered", when(v.created_at)], ["Ready", when(v.ready_at)],
      ["Aliases", v.aliases.join(", ")], ["Deployments", v.deployments.join(", ")], ["Description", v.description],
    ]),
    h("section", { id: "lineage" }, h("h2", {}, "Lineage"), facts([
      ["Dataset", cells.dataset],
      ["Training job", cells.job],
      ["Trained from", lineage.parent?.name ? versionLink(lineage.parent.name, lineage.parent.version) : "scratch"],
      ["Code", lineage.code_version ? h("code", {}, lineage.code_version) : ""],
    ]), environment.length ? h("details", {}, h("summary", {}, "Environment"),
      table([["Key", ([key]) => key], ["Value", ([, value]) => value]], environment)) : null),
    h("section", {}, h("h2", {}, "Metrics"),
      table([["Metric", ([key]) => key], ["Value", ([, value]) => number(value)]],
        Object.entries(v.metrics ?? {}).sort(), { id: "version-metrics" })),
    evaluationSection(evaluated, { withVersion: false, id: "version-evaluations" }),
    h("section", {}, h("h2", {}, "Artifacts"), table([
      ["Path", (a) => h("code", {}, a.path)], ["Role", (a) => a.object?.role], ["Size", (a) => bytes(a.object?.size)],
      ["SHA-256", (a) => h("code", { class: "digest" }, a.object?.sha256)],
    ], v.artifacts, { id: "artifacts" })),
    h("section", {}, h("h2", {}, "Exports"), table([
      ["Format", (e) => e.format], ["State", (e) => badge(e.state)], ["Parity", (e) => parity(e.parity)],
      ["Error", (e) => e.error || "—"], ["Updated", (e) => when(e.updated_at)],
    ], v.exports, { id: "exports", empty: "Not exported yet." })));
}
