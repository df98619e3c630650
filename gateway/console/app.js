// The console's shell: sign-in with an API key, hash routes, and one view on screen at a time.
// Each view gets an AbortSignal that fires when the user navigates away, which stops its polling
// and closes its event streams.

import { api, session } from "./api.js";
import { errorBox, h } from "./dom.js";
import * as datasets from "./datasets.js";
import * as deployments from "./deployments.js";
import * as jobs from "./jobs.js";
import * as models from "./models.js";
import * as playground from "./playground.js";

const ROUTES = [
  [/^#\/datasets$/, "datasets", datasets.list],
  [/^#\/datasets\/([^/]+)$/, "datasets", datasets.show],
  [/^#\/jobs$/, "jobs", jobs.list],
  [/^#\/jobs\/([^/]+)$/, "jobs", jobs.show],
  [/^#\/models$/, "models", models.list],
  [/^#\/models\/([^/]+)$/, "models", models.show],
  [/^#\/models\/([^/]+)\/versions\/(\d+)$/, "models", models.version],
  [/^#\/deployments$/, "deployments", deployments.list],
  [/^#\/deployments\/([^/]+)$/, "deployments", deployments.show],
  [/^#\/playground$/, "playground", playground.show],
  [/^#\/playground\/([^/]+)$/, "playground", playground.show],
];

const $ = (id) => document.getElementById(id);
let current = null; // AbortController of the view on screen

function signedIn(yes) {
  $("sign-in").hidden = yes;
  $("nav").hidden = !yes;
  $("sign-out").hidden = !yes;
  $("view").hidden = !yes;
}

async function route() {
  current?.abort();
  if (!session.key) {
    signedIn(false);
    $("api-key").focus();
    return;
  }
  signedIn(true);
  const hash = location.hash || "#/datasets";
  const found = ROUTES.map(([pattern, section, render]) => [hash.match(pattern), section, render])
    .find(([match]) => match);
  if (!found) {
    location.hash = "#/datasets";
    return;
  }
  const [match, section, render] = found;
  for (const anchor of $("nav").querySelectorAll("a")) {
    anchor.classList.toggle("active", anchor.dataset.section === section);
  }
  const controller = current = new AbortController();
  const view = $("view");
  view.replaceChildren(h("p", { class: "loading" }, "Loading…"));
  try {
    const node = await render(match.slice(1).map(decodeURIComponent), controller.signal);
    if (!controller.signal.aborted) view.replaceChildren(node);
  } catch (error) {
    if (controller.signal.aborted || error.name === "AbortError" || error.status === 401) return;
    view.replaceChildren(errorBox(error));
  }
}

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  session.set(key);
  $("sign-in-error").textContent = "";
  try {
    await api("/v1/datasets?page_size=1");
  } catch (error) {
    // 401: the key is unknown (the listener below says so); 403: a valid key whose role cannot list
    // datasets, which still may use the rest of the console it is allowed to see.
    if (error.status !== 403) {
      if (error.status !== 401) $("sign-in-error").textContent = error.message;
      session.clear();
      return;
    }
  }
  $("api-key").value = "";
  route();
}

window.addEventListener("llmp:unauthenticated", (event) => {
  session.clear();
  current?.abort();
  signedIn(false);
  $("sign-in-error").textContent = `The API key was refused: ${event.detail}`;
});
window.addEventListener("hashchange", route);
$("sign-in").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", () => {
  session.clear();
  route();
});
route();
