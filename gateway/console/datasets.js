// Datasets: every dataset's latest version with its split statistics; one dataset's versions with
// splits, cleaning and the manifest's checksums.

import { api, upload } from "./api.js";
import { badge, bytes, count, encode, facts, h, link, table, when } from "./dom.js";
import { actionForm, field, input, select, values } from "./forms.js";
import { poll } from "./live.js";

export const SPLITS = ["train", "validation", "test", "calibration"];

function splitCell(split) {
  if (!split) return "—";
  return h("span", { class: "split", "data-documents": split.documents, "data-tokens": split.tokens },
    `${count(split.documents)} docs · ${count(split.tokens)} tok`);
}

function datasetsTable(datasets) {
  return table([
    ["Name", (d) => link(`#/datasets/${encode(d.name)}`, d.name)],
    ["Version", (d) => `v${d.latest.version}`],
    ["State", (d) => badge(d.latest.state)],
    ["Tokenizer", (d) => (d.latest.tokenizer?.kind ? `${d.latest.tokenizer.kind} (${count(d.latest.tokenizer.vocab_size)})` : "—")],
    ...SPLITS.map((name) => [name[0].toUpperCase() + name.slice(1), (d) => splitCell(d.latest.splits?.[name])]),
    ["Created", (d) => when(d.latest.created_at)],
  ], datasets, { id: "datasets-table", class: "grid", empty: "No datasets yet: create one with POST /v1/datasets or `llmp dataset create FILE`." });
}

export async function list(_, signal) {
  const load = () => api("/v1/datasets?page_size=200", { signal });
  const first = await load();
  const holder = h("div", {}, datasetsTable(first.datasets));
  // New datasets and PENDING ones finishing show up without a reload.
  poll(signal, 3000, load, (data) => holder.replaceChildren(datasetsTable(data.datasets)), { initial: first });
  return h("div", {}, h("h1", {}, "Datasets"), uploadForm(), holder);
}

// A corpus from this computer becomes a dataset's next version: POST /v1/datasets with the file as the body,
// its bytes counted out by the upload's progress events; the table above shows it build until READY.
function uploadForm() {
  const file = input("corpus", { type: "file", required: true });
  const bar = h("progress", { id: "upload-progress", max: 1, value: 0 });
  const sent = h("span", { id: "upload-sent", class: "muted" });
  return actionForm({
    id: "dataset-upload", title: "Upload a corpus", submit: "Upload",
    children: [
      field("Corpus file", file, "text (documents separated by blank lines), JSON lines, pairs or chat"),
      field("Dataset name", input("name", { required: true, maxlength: 63 })),
      field("Format", select("format", ["text", "jsonl", "pairs", "chat"])),
      field("Tokenizer", select("tokenizer", [["bpe", "bpe (trained on the corpus)"], ["char", "char"]])),
      field("Vocabulary size", input("vocab_size", { type: "number", min: 1, placeholder: "default" }), "bpe only"),
      h("div", { class: "field" }, bar, sent),
    ],
    act: async (form) => {
      const corpus = file.files[0];
      const query = new URLSearchParams(values(form));
      const created = await upload(`/v1/datasets?${query}`, corpus, {
        progress: (done, total) => {
          bar.max = total || 1;
          bar.value = done;
          sent.textContent = ` ${bytes(done)} of ${bytes(total)}`;
        },
      });
      return h("span", {}, "Uploaded: ", link(`#/datasets/${encode(created.name)}`, `${created.name} v${created.version}`),
        ` (${created.state})`);
    },
  });
}

function splitsTable(version) {
  return table([
    ["Split", (name) => name],
    ["Documents", (name) => count(version.splits[name]?.documents)],
    ["Tokens", (name) => count(version.splits[name]?.tokens)],
    ["Bytes", (name) => bytes(version.splits[name]?.bytes)],
    ["Shards", (name) => count(version.splits[name]?.shards?.length)],
    ["Near duplicates", (name) => count(version.splits[name]?.near_duplicates)],
    ["Leaks removed", (name) => count((version.splits[name]?.leaked_exact ?? 0) + (version.splits[name]?.leaked_near ?? 0))],
  ], SPLITS.filter((name) => version.splits?.[name]), { class: "splits", empty: "No splits yet." });
}

function versionSection(version) {
  const cleaning = version.cleaning ?? {};
  return h("section", { class: "card", id: `dataset-version-${version.version}` },
    h("h2", {}, `v${version.version} `, badge(version.state)),
    version.error ? h("p", { class: "error" }, version.error) : null,
    facts([
      ["Created", when(version.created_at)], ["Finished", when(version.finished_at)],
      ["Corpus", bytes(version.source_bytes)], ["Digest", h("code", {}, version.digest)],
      ["Tokenizer", version.tokenizer?.kind ? `${version.tokenizer.kind}, vocabulary ${count(version.tokenizer.vocab_size)}, ${version.tokenizer.dtype}` : ""],
      ["Documents", cleaning.documents_in !== undefined ? `${count(cleaning.documents_in)} in → ${count(cleaning.documents_out)} kept (${count(cleaning.exact_duplicates)} exact duplicates)` : ""],
    ]),
    splitsTable(version),
    h("details", {}, h("summary", {}, `Manifest: ${version.manifest?.objects?.length ?? 0} objects`),
      h("p", {}, h("code", {}, version.manifest?.key ?? "")),
      table([
        ["Key", (o) => h("code", {}, o.key)], ["Role", (o) => o.role], ["Size", (o) => bytes(o.size)],
        ["SHA-256", (o) => h("code", { class: "digest" }, o.sha256)],
      ], version.manifest?.objects ?? [])));
}

export async function show([name], signal) {
  const load = () => api(`/v1/datasets/${encode(name)}`, { signal });
  const first = await load();
  const holder = h("div", {}, first.versions.map(versionSection));
  poll(signal, 3000, load, (data) => holder.replaceChildren(...data.versions.map(versionSection)), {
    initial: first, more: (data) => data.versions.some((v) => v.state === "PENDING"),
  });
  return h("div", {}, h("p", {}, link("#/datasets", "← Datasets")), h("h1", {}, `Dataset ${name}`), holder);
}
