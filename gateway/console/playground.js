// The playground: a conversation with a deployment through POST /openai/v1/chat/completions, streamed.
// The answer grows in place as the Server-Sent Events arrive (each `delta.content` appended), and the
// conversation so far goes with every turn, so the model sees the whole exchange.

import { api, events } from "./api.js";
import { errorBox, h } from "./dom.js";
import { field, input, select } from "./forms.js";

function bubble(role, text = "") {
  return h("div", { class: `turn ${role}`, "data-role": role }, h("strong", {}, role), h("p", { class: "content" }, text));
}

export async function show([chosen = ""], signal) {
  const { data: models } = await api("/openai/v1/models", { signal });
  const names = models.map((m) => m.id);
  if (chosen && !names.includes(chosen)) names.unshift(chosen); // not READY yet: the API will say so
  const deployment = select("deployment", names, { value: chosen || names[0], id: "chat-deployment" });
  const system = h("textarea", { name: "system", id: "chat-system", rows: 2, placeholder: "optional system message" });
  const temperature = input("temperature", { id: "chat-temperature", type: "number", min: 0, max: 2, step: "any", value: 0.7 });
  const maxTokens = input("max_tokens", { id: "chat-max-tokens", type: "number", min: 1, value: 128 });
  const message = h("textarea", { name: "message", id: "chat-message", rows: 3, required: true, placeholder: "Say something" });
  const send = h("button", { type: "submit" }, "Send");
  const stop = h("button", { type: "button", hidden: true }, "Stop");
  const transcript = h("div", { id: "chat-transcript", class: "transcript" });
  const status = h("div", { class: "form-status", role: "status" });
  const history = []; // {role, content} of the finished turns
  let running = null;

  const clear = h("button", { type: "button", onclick: () => { history.length = 0; transcript.replaceChildren(); } },
    "New conversation");
  stop.addEventListener("click", () => running?.abort());

  async function turn(event) {
    event.preventDefault();
    const text = message.value.trim();
    if (!text || running) return;
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []),
      ...history, { role: "user", content: text }];
    transcript.append(bubble("user", text));
    const answer = bubble("assistant");
    const content = answer.querySelector(".content");
    answer.dataset.chunks = "0";
    answer.dataset.state = "streaming";
    transcript.append(answer);
    message.value = "";
    status.replaceChildren();
    running = new AbortController();
    const stopped = () => running.abort();
    signal.addEventListener("abort", stopped, { once: true });
    send.disabled = true;
    stop.hidden = false;
    try {
      const body = { model: deployment.value, messages, stream: true,
        temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
      for await (const { data } of events("/openai/v1/chat/completions", { body, signal: running.signal })) {
        if (data.error) throw Object.assign(new Error(data.error.message), { status: "stream", type: data.error.type });
        const piece = data.choices?.[0]?.delta?.content;
        if (piece) {
          content.textContent += piece;
          answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        }
        const finish = data.choices?.[0]?.finish_reason;
        if (finish) answer.dataset.finish = finish;
      }
      history.push({ role: "user", content: text }, { role: "assistant", content: content.textContent });
      answer.dataset.state = "done";
    } catch (error) {
      answer.dataset.state = "failed";
      if (error.name !== "AbortError") status.replaceChildren(errorBox(error));
      else answer.dataset.state = "stopped";
    } finally {
      signal.removeEventListener("abort", stopped);
      running = null;
      send.disabled = false;
      stop.hidden = true;
    }
  }

  const form = h("form", { id: "chat-form", class: "card action", onsubmit: turn },
    h("div", { class: "row" }, field("Deployment", deployment), field("Temperature", temperature),
      field("Max tokens", maxTokens)),
    field("System", system), transcript, field("Message", message),
    h("div", { class: "actions" }, send, stop, clear), status);
  message.addEventListener("keydown", (event) => { // Enter sends, Shift+Enter breaks the line
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  return h("div", {}, h("h1", {}, "Playground"),
    names.length ? form : h("p", { class: "empty" }, "No deployment this key may call."),
    names.length ? null : h("p", {}, h("a", { href: "#/deployments" }, "Deployments")));
}
