"""The console acts, and `llmp chat` talks, against the whole stack (`llmp up`).

Each action is performed in headless Chromium through the console's forms, and its effect is read back
through the REST API: a corpus uploaded with its progress becomes a READY dataset, a job submitted from
the form carries the form's values, an alias moves (and a stale page's move is refused with the API's
412), a canary gets and changes its weight, and the playground streams a chat answer piece by piece that
equals the API's own answer at temperature 0. Then the CLI: `llmp chat` keeps the conversation, streams,
and ends cleanly on end of input and on Ctrl-C.

The chat model is tiny and built here (tests/chat_checkpoints.py), imported through the REST API as two
versions of model `console-chat`, and deployed (the one-step deploy exports it to ONNX first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from cli import model_archive
from cli.chat import Conversation
from tests.chat_checkpoints import build_chat_model

from .test_console import browser, console_url, open_view, wait, wait_for  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = DEPLOYMENT = "console-chat"
UPLOADED = "console-upload"


def import_version(client, folder) -> dict:
    chunks, total = model_archive.archive(folder)
    created = client.upload(f"/v1/models/{MODEL}/imports", (chunks, total), content_type="application/x-tar")
    status = client.wait_until(f"/v1/models/{MODEL}/imports/{created['version']}",
                               lambda s: s["state"] != "PENDING", 300)
    assert status["state"] == "READY", status
    return status


@pytest.fixture(scope="module")
def chat_versions(stack, tmp_path_factory) -> list[int]:
    """Versions 1 and 2 of `console-chat` (two trainings of the same conversations, other seeds)."""
    client = stack.client()
    versions = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"chat-model-{seed}")
        build_chat_model(folder, seed=seed)
        versions.append(import_version(client, folder)["version"])
    return versions


@pytest.fixture(scope="module")
def deployment(stack, chat_versions) -> dict:
    client = stack.client()
    client.call("PUT", f"/v1/deployments/{DEPLOYMENT}", {"model": MODEL, "stable": chat_versions[0]},
                headers={"If-None-Match": "*"})
    return wait_for(client, f"/v1/deployments/{DEPLOYMENT}", "READY", 420)


def chat_answer(client, messages: list[dict], max_tokens: int = 16) -> str:
    answer = client.call("POST", "/openai/v1/chat/completions", {
        "model": DEPLOYMENT, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    return answer["choices"][0]["message"]["content"]


def fill(driver, form_id: str, name: str, value: str) -> None:
    control = driver.find_element(By.CSS_SELECTOR, f"#{form_id} [name='{name}']")
    if control.tag_name == "select":
        Select(control).select_by_value(value)
    else:
        control.clear()
        control.send_keys(value)


def submit(driver, form_id: str, timeout: float = 60) -> str:
    """Submits the form; its status text once the API answered (raises with the text if it failed)."""
    driver.find_element(By.CSS_SELECTOR, f"#{form_id} button[type=submit]").click()
    state = wait(driver, lambda d: d.execute_script(
        "const f = document.getElementById(arguments[0]); return f && ['done', 'failed'].includes(f.dataset.state)"
        " && f.dataset.state", form_id), timeout=timeout, message=f"form {form_id} to be answered")
    status = driver.execute_script(
        "return document.querySelector(`#${arguments[0]} .form-status`).innerText.trim()", form_id)
    return f"{state}: {status}"


# -- the console ----------------------------------------------------------------------------------------

def test_a_corpus_uploaded_with_progress_becomes_a_ready_dataset(browser, console_url, stack, tmp_path):  # noqa: F811
    from cli import demo

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(demo.stdlib_docstrings(limit_bytes=400_000))  # JSON lines, {"text": …}
    size = corpus.stat().st_size
    open_view(browser, console_url, "#/datasets", stack.admin_key)
    wait(browser, lambda d: d.find_elements(By.ID, "dataset-upload"), message="the upload form")
    browser.find_element(By.CSS_SELECTOR, "#dataset-upload input[type=file]").send_keys(str(corpus))
    fill(browser, "dataset-upload", "name", UPLOADED)
    fill(browser, "dataset-upload", "format", "jsonl")
    fill(browser, "dataset-upload", "tokenizer", "char")
    outcome = submit(browser, "dataset-upload")
    assert outcome.startswith("done: Uploaded: console-upload v1"), outcome
    progress = browser.execute_script(
        "const p = document.getElementById('upload-progress'); return [p.value, p.max]")
    assert progress == [size, size]  # the upload's own byte count, up to the whole file
    dataset = wait_for(stack.client(), f"/v1/datasets/{UPLOADED}/versions/1", "READY", 180)
    assert dataset["source_bytes"] == size and dataset["splits"]["train"]["tokens"] > 0

    # A refusal is shown as the API words it, and the form stays usable.
    fill(browser, "dataset-upload", "name", "Not A Name")
    browser.find_element(By.CSS_SELECTOR, "#dataset-upload input[type=file]").send_keys(str(corpus))
    outcome = submit(browser, "dataset-upload")
    assert outcome.startswith("failed: 4") and "name" in outcome, outcome


def test_a_training_job_submitted_from_the_form(browser, console_url, stack):  # noqa: F811
    open_view(browser, console_url, "#/jobs", stack.admin_key)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"#job-submit option[value='{UPLOADED}@1']"),
         message="the uploaded dataset among the choices")
    for name, value in [("dataset.ref", f"{UPLOADED}@1"), ("model.family", "gpt2"), ("model.n_layer", "1"),
                        ("model.n_head", "2"), ("model.n_embd", "32"), ("model.block_size", "32"),
                        ("hyperparameters.max_steps", "4"), ("hyperparameters.batch_size", "8"),
                        ("hyperparameters.learning_rate", "0.003"), ("hyperparameters.warmup_steps", "1"),
                        ("hyperparameters.eval_interval", "2"), ("hyperparameters.seed", "7")]:
        fill(browser, "job-submit", name, value)
    outcome = submit(browser, "job-submit")
    assert outcome.startswith("done: Submitted job"), outcome
    href = browser.execute_script("return document.querySelector('#job-submit .form-status a').getAttribute('href')")
    job = stack.client().call("GET", f"/v1/training-jobs/{href.removeprefix('#/jobs/')}")
    spec = job["spec"]
    assert spec["dataset"] == {"name": UPLOADED, "version": 1}
    assert {k: spec["model"][k] for k in ("family", "n_layer", "n_head", "n_embd", "block_size")} == {
        "family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}
    hp = spec["hyperparameters"]
    assert (hp["max_steps"], hp["batch_size"], hp["warmup_steps"], hp["eval_interval"], hp["seed"]) == (4, 8, 1, 2, 7)
    assert hp["learning_rate"] == pytest.approx(0.003)


def test_an_alias_moves_and_a_stale_page_is_refused(browser, console_url, stack, chat_versions):  # noqa: F811
    v1, v2 = chat_versions
    client = stack.client()
    alias = f"/v1/models/{MODEL}/aliases/production"
    client.call("PUT", alias, {"version": v1, "reason": "first"}, headers={"If-None-Match": "*"})
    open_view(browser, console_url, f"#/models/{MODEL}", stack.admin_key)
    wait(browser, lambda d: d.find_elements(By.ID, "move-production"), message="the alias's move form")
    fill(browser, "move-production", "version", str(v2))
    fill(browser, "move-production", "reason", "from the console")
    assert submit(browser, "move-production").startswith(f"done: production → v{v2}")
    assert client.call("GET", alias)["version"] == v2
    assert client.call("GET", alias + "/history")["entries"][-1]["reason"] == "from the console"
    # The page redrew from the API: its form now holds the new ETag. Someone else moves the alias meanwhile;
    # the page's next move carries the old ETag and is refused, the other move standing.
    wait(browser, lambda d: "production → v" + str(v2) in d.execute_script(
        "return document.querySelector('[data-alias=production] h3')?.innerText ?? ''"), message="the redraw")
    _, etag = client.call_with_etag(alias)
    client.call("PUT", alias, {"version": v1, "reason": "elsewhere"}, headers={"If-Match": etag})
    fill(browser, "move-production", "version", str(v1))
    outcome = submit(browser, "move-production")
    assert outcome.startswith("failed: 412"), outcome
    assert client.call("GET", alias + "/history")["entries"][-1]["reason"] == "elsewhere"


def test_the_playground_streams_the_apis_answer(browser, console_url, stack, deployment):  # noqa: F811
    open_view(browser, console_url, f"#/playground/{DEPLOYMENT}", stack.admin_key)
    wait(browser, lambda d: d.find_elements(By.ID, "chat-form"), message="the playground")
    # Every state of the answer on screen, as the page changes it.
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const answer = [...document.querySelectorAll('#chat-transcript [data-role=assistant] .content')].pop();
          if (answer && window.seen.at(-1) !== answer.textContent) window.seen.push(answer.textContent);
        }).observe(document.getElementById('chat-transcript'),
                   {subtree: true, childList: true, characterData: true});""")
    fill(browser, "chat-form", "temperature", "0")
    fill(browser, "chat-form", "max_tokens", "16")
    history: list[dict] = []
    for turn, question in enumerate(["say hi", "count to three"]):
        browser.execute_script("window.seen = []")
        fill(browser, "chat-form", "message", question)
        browser.find_element(By.CSS_SELECTOR, "#chat-form button[type=submit]").click()
        state = wait(browser, lambda d, turn=turn: d.execute_script(
            "const a = document.querySelectorAll('#chat-transcript [data-role=assistant]')[arguments[0]];"
            "return a && a.dataset.state !== 'streaming' && a.dataset.state", turn), message="the answer")
        assert state == "done", browser.execute_script(
            "return document.querySelector('#chat-form .form-status').innerText")
        shown, chunks, seen = browser.execute_script(
            "const a = document.querySelectorAll('#chat-transcript [data-role=assistant]')[arguments[0]];"
            "return [a.querySelector('.content').textContent, +a.dataset.chunks, window.seen]", turn)
        history.append({"role": "user", "content": question})
        expected = chat_answer(stack.client(), history)
        assert shown == expected and expected.strip()
        history.append({"role": "assistant", "content": expected})
        # Token by token: the text grew through several states, each a prefix of the next.
        seen = [text for text in seen if text]
        assert chunks >= 2 and len(seen) >= 2, (chunks, seen)
        assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:], strict=False))
        assert seen[-1] == expected
    assert history[1]["content"] == "hello there"  # what the tiny model was taught to answer


def test_a_canary_is_added_and_its_weight_changed(browser, console_url, stack, deployment, chat_versions):  # noqa: F811
    v2 = chat_versions[1]
    path = f"/v1/deployments/{DEPLOYMENT}"
    open_view(browser, console_url, f"#/deployments/{DEPLOYMENT}", stack.admin_key)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"#canary-form option[value='{v2}']"),
         message="the canary form")
    for weight in (30, 60):
        fill(browser, "canary-form", "version", str(v2))
        fill(browser, "canary-form", "weight", str(weight))
        assert submit(browser, "canary-form").startswith(f"done: v{v2} now receives {weight}%")
        served = stack.client().call("GET", path)
        assert served["canary"]["version"] == v2 and served["canary"]["weight"] == weight
        assert served["stable"] == deployment["stable"]
    # The page shows the new weight once it polls (no reload).
    wait(browser, lambda d: d.execute_script(
        "return document.getElementById('canary-weight')?.dataset.weight") == "60", message="the weight on the page")
    # A change made elsewhere: the form's ETag is stale only until the page reads the deployment again.
    stack.client().put_conditionally(path, {"model": MODEL, "stable": deployment["stable"],
                                            "canary": {"version": v2, "weight": 10}})
    fill(browser, "canary-form", "weight", "70")
    outcome = submit(browser, "canary-form")
    weight = stack.client().call("GET", path)["canary"]["weight"]
    assert (outcome.startswith("failed: 412") and weight == 10) or (outcome.startswith("done") and weight == 70), (
        outcome, weight)


# -- llmp chat -------------------------------------------------------------------------------------------

def llmp_chat(stack, *args: str) -> subprocess.Popen:
    # Ctrl-C as at a terminal, whatever this run inherited: a job started in the background by a shell without
    # job control has SIGINT ignored, and Python then never raises KeyboardInterrupt in the chat.
    return subprocess.Popen([sys.executable, "-m", "cli.main", "chat", DEPLOYMENT, *args], env=stack.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_llmp_chat_keeps_the_conversation_and_ends_at_end_of_input(stack, deployment):
    # Without a canary, so every turn is answered by the same version.
    stack.client().put_conditionally(f"/v1/deployments/{DEPLOYMENT}", {"model": MODEL, "stable": deployment["stable"]})
    system = "you are terse"
    chat = llmp_chat(stack, "--temperature", "0", "--max-tokens", "16", "--system", system)
    out, err = chat.communicate("say hi\n\ncount to three\n", timeout=120)
    assert chat.returncode == 0, err
    history = [{"role": "system", "content": system}]
    expected = []
    for question in ["say hi", "count to three"]:
        history.append({"role": "user", "content": question})
        expected.append(chat_answer(stack.client(), history))
        history.append({"role": "assistant", "content": expected[-1]})
    assert out.splitlines() == expected and all(expected)


def test_llmp_chat_streams_piece_by_piece(stack, deployment):
    conversation = Conversation(stack.client(), DEPLOYMENT, temperature=0, max_tokens=16)
    pieces = list(conversation.ask("name a king"))
    expected = chat_answer(stack.client(), [{"role": "user", "content": "name a king"}])
    assert len(pieces) >= 2 and "".join(pieces) == expected
    assert conversation.history[-1] == {"role": "assistant", "content": "".join(pieces)}


def test_llmp_chat_ends_cleanly_on_ctrl_c_and_names_an_unknown_deployment(stack, deployment):
    chat = llmp_chat(stack)
    time.sleep(5)  # started and waiting for a line
    os.kill(chat.pid, signal.SIGINT)
    out, err = chat.communicate(timeout=30)
    assert chat.returncode == 130 and "Traceback" not in err, err

    missing = subprocess.run([sys.executable, "-m", "cli.main", "chat", "no-such-deployment"], env=stack.env,
                             input="hello\n", capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "error: 404" in missing.stderr, missing.stderr
