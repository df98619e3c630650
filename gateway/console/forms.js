// Forms that act through the API: labelled fields, and a submit that disables the form while the request
// runs and then shows either what was done or the API's error message (never a silent failure).

import { errorBox, h } from "./dom.js";

let fieldIds = 0;

// A labelled control: `h("input", …)` or `h("select", …)`; the label points at it.
export function field(label, control, hint) {
  control.id ||= `field-${++fieldIds}`;
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control,
    hint ? h("small", { class: "muted" }, hint) : null);
}

export const input = (name, attributes = {}) => h("input", { name, ...attributes });

export function select(name, options, { value, ...attributes } = {}) {
  const element = h("select", { name, ...attributes },
    options.map((option) => (Array.isArray(option)
      ? h("option", { value: option[0] }, option[1]) : h("option", { value: option }, option))));
  if (value !== undefined && value !== null) element.value = String(value);
  return element;
}

// A form whose submit runs `act(form)`; its answer (a node or text) goes in the form's status line, an
// error as the API worded it. `id` names the form for tests and links.
export function actionForm({ id, title, children, submit, act }) {
  const status = h("div", { class: "form-status", role: "status" });
  const button = h("button", { type: "submit" }, submit);
  const form = h("form", { id, class: "card action" }, title ? h("h2", {}, title) : null, children,
    h("div", { class: "actions" }, button), status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    status.replaceChildren();
    form.dataset.state = "running";
    try {
      const done = await act(form, status);
      status.replaceChildren(h("p", { class: "ok" }, done ?? "Done."));
      form.dataset.state = "done";
    } catch (error) {
      status.replaceChildren(errorBox(error));
      form.dataset.state = "failed";
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

// The form's named controls as {name: value}; blanks left out, numbers as numbers for type=number.
export function values(form) {
  const out = {};
  for (const control of form.elements) {
    if (!control.name || control.type === "file" || control.value === "") continue;
    out[control.name] = control.type === "number" ? Number(control.value) : control.value;
  }
  return out;
}
