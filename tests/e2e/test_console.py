"""The web console in headless Chromium against the whole stack.

Data is made through the REST API (a dataset, two training jobs, an alias moved once, a deployment
with a canary); the test then checks that the console, driven like a user would, shows it: the
datasets table with split statistics, a job's loss curve drawn live, a model's lineage and alias
history, a deployment's canary weight.

Chromium is Debian's `chromium` with `chromium-driver`, driven by Selenium through
`/usr/bin/chromedriver` (nothing is downloaded).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from cli.client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]
NAME = "console"  # dataset and model name (the model is registered under the dataset's name)
DEPLOYMENT = "console-web"
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="module")
def console_url(stack) -> str:
    """The stack's own gateway, which serves the console at `/`."""
    return f"http://127.0.0.1:{stack.env['LLMP_GATEWAY_PORT']}"


# -- the browser -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition, timeout: float = 30, message: str = ""):
    """Poll `condition(driver)` until truthy; on timeout fail with the page's console log."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except Exception:
        logs = [entry["message"] for entry in driver.get_log("browser")]
        pytest.fail(f"{message or condition} not met in {timeout}s at {driver.current_url}\n"
                    f"page: {text(driver, 'body')[:2000]}\nconsole log: {logs}")


def text(driver: WebDriver, selector: str) -> str:
    """The text of the first element matching `selector`, read in one step (views redraw as data arrives,
    so a WebElement found a moment earlier may already be gone)."""
    return driver.execute_script("return document.querySelector(arguments[0])?.innerText.trim() ?? ''", selector)


def visible(driver: WebDriver, element_id: str) -> bool:
    return driver.execute_script(f"return !document.getElementById({json.dumps(element_id)}).hidden")


def sign_in(driver: WebDriver, key: str) -> None:
    field = wait(driver, lambda d: visible(d, "sign-in") and d.find_element(By.ID, "api-key"), message="sign-in form")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()


def open_view(driver: WebDriver, base_url: str, route: str, key: str) -> None:
    """Show `#route`, signing in first when the page asks for a key."""
    if not driver.current_url.startswith(base_url):
        driver.get(base_url + "/")
    driver.execute_script("location.hash = arguments[0]", route)
    wait(driver, lambda d: visible(d, "sign-in") or visible(d, "view"), message="the page to load")
    if visible(driver, "sign-in"):
        sign_in(driver, key)
    wait(driver, lambda d: visible(d, "view") and d.execute_script("return location.hash") == route,
         message=f"view {route}")


def cells(driver: WebDriver, table_id: str, first_cell: str) -> list[str]:
    """The cells' text of the row of `#table_id` whose first cell reads `first_cell` (empty when none)."""
    return driver.execute_script("""
        const table = document.getElementById(arguments[0]);
        if (!table) return [];
        for (const row of table.querySelectorAll("tbody tr")) {
          const texts = [...row.cells].map((cell) => cell.textContent.trim());
          if (texts[0] === arguments[1]) return texts;
        }
        return [];""", table_id, first_cell)


# -- data made through the API -----------------------------------------------------------------------

def wait_for(client: Client, path: str, done: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        resource = client.call("GET", path)
        if resource["state"] == done:
            return resource
        assert resource["state"] not in {"FAILED", "CANCELLED"}, resource
        assert time.monotonic() < deadline, f"{path} still {resource['state']} after {timeout}s"
        time.sleep(0.5)


def job_spec(version: int, *, max_steps: int, seed: int, init_from: dict | None = None) -> dict:
    model = {"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0}
    if init_from:
        model["init_from"] = init_from
    return {
        "dataset": {"name": NAME, "version": version}, "model": model,
        "hyperparameters": {"batch_size": 8, "max_steps": max_steps, "learning_rate": 3e-3, "min_learning_rate": 3e-4,
                            "warmup_steps": 2, "eval_interval": 10, "eval_batches": 2, "log_interval": 2,
                            "seed": seed, "precision": "fp32"},
        "distributed": {"mode": "ddp", "nproc_per_node": 1, "nnodes": 1},
    }


@pytest.fixture(scope="module")
def dataset(stack) -> dict:
    from cli import demo

    client = stack.client()
    corpus = demo.stdlib_docstrings(limit_bytes=60_000)
    created = client.upload("/v1/datasets", corpus, query={"name": NAME, "tokenizer": "char", "format": "jsonl"})
    return wait_for(client, f"/v1/datasets/{NAME}/versions/{created['version']}", "READY", 120)


@pytest.fixture(scope="module")
def first_job(stack, dataset) -> dict:
    """Submitted, not waited for: the console watches it train."""
    return stack.client().call("POST", "/v1/training-jobs", job_spec(dataset["version"], max_steps=20, seed=1),
                               headers={"Idempotency-Key": f"console-e2e-{dataset['version']}-1"})


@pytest.fixture(scope="module")
def registry(stack, dataset, first_job) -> dict:
    """Version 1 from the first job, version 2 fine-tuned from it; `production` moved from v1 to v2."""
    client = stack.client()
    first = wait_for(client, f"/v1/training-jobs/{first_job['id']}", "SUCCEEDED", 240)
    v1 = first["model_version"]
    second_job = client.call("POST", "/v1/training-jobs",
                             job_spec(dataset["version"], max_steps=4, seed=2, init_from=v1),
                             headers={"Idempotency-Key": f"console-e2e-{dataset['version']}-2"})
    second = wait_for(client, f"/v1/training-jobs/{second_job['id']}", "SUCCEEDED", 240)
    v2 = second["model_version"]
    alias = f"/v1/models/{v1['name']}/aliases/production"
    client.call("PUT", alias, {"version": v1["version"], "reason": "first model"}, headers={"If-None-Match": "*"})
    _, etag = client.call_with_etag(alias)
    client.call("PUT", alias, {"version": v2["version"], "reason": "fine-tuned"}, headers={"If-Match": etag})
    return {"v1": v1, "v2": v2, "first_job": first, "second_job": second}


# -- the console -------------------------------------------------------------------------------------

def test_the_page_asks_for_a_key_refuses_a_wrong_one_and_keeps_the_right_one(browser, console_url, stack):
    browser.get(console_url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    sign_in(browser, "llmp_not-a-key")
    wait(browser, lambda d: "refused" in text(d, "#sign-in-error"), message="the refusal")
    assert visible(browser, "sign-in") and not visible(browser, "nav")
    sign_in(browser, stack.admin_key)
    wait(browser, lambda d: visible(d, "nav"), message="the signed-in page")
    assert browser.execute_script("return sessionStorage.getItem('llmp.apiKey')") == stack.admin_key
    assert browser.execute_script("return localStorage.length") == 0


def test_datasets_table_shows_split_statistics(browser, console_url, stack, dataset):
    open_view(browser, console_url, "#/datasets", stack.admin_key)
    row = wait(browser, lambda d: cells(d, "datasets-table", NAME), message="the dataset's row")
    assert row[1] == f"v{dataset['version']}" and row[2] == "READY" and row[3].startswith("char")
    shown = browser.execute_script("""
        const row = [...document.querySelectorAll("#datasets-table tbody tr")]
          .find((r) => r.cells[0].textContent.trim() === arguments[0]);
        return [...row.querySelectorAll(".split")].map((s) => [+s.dataset.documents, +s.dataset.tokens]);""", NAME)
    splits = dataset["splits"]
    assert shown == [[splits[name]["documents"], splits[name]["tokens"]]
                     for name in ("train", "validation", "test", "calibration")]
    assert shown[0][1] > 0


def test_a_jobs_loss_curve_is_drawn_live(browser, console_url, stack, first_job):
    job_path = f"/v1/training-jobs/{first_job['id']}"
    open_view(browser, console_url, f"#/jobs/{first_job['id']}", stack.admin_key)
    first_state = wait(browser, lambda d: text(d, "#job-summary .badge"), message="the job's state")
    # Opened before the job ended, then followed by the event stream alone (no reload).
    assert first_state not in FINAL or stack.client().call("GET", job_path)["state"] in FINAL
    seen_points = set()

    def finished(driver):
        # One script reads both, so no event can be handled between reading the chart and the badge.
        points, state = driver.execute_script(
            "return [+(document.querySelector('#loss-chart path[data-series=train_loss]')?.dataset.points ?? 0),"
            " document.querySelector('#job-summary .badge')?.innerText.trim() ?? '']")
        seen_points.add(points)
        return state == "SUCCEEDED"

    wait(browser, finished, timeout=240, message="the job to succeed on the page")
    metrics = stack.client().call("GET", job_path + "/metrics")
    train, validation = metrics["train_loss"], metrics["validation_loss"]
    assert len(train) >= 5 and validation
    drawn = browser.execute_script("""
        const out = {};
        for (const path of document.querySelectorAll('#loss-chart path[data-series]')) {
          const coords = path.getAttribute('d').slice(1).split('L').map((p) => p.split(',').map(Number));
          out[path.dataset.series] = {points: +path.dataset.points, coords};
        }
        return out;""")
    assert drawn["train_loss"]["points"] == len(train) == len(drawn["train_loss"]["coords"])
    assert drawn["validation_loss"]["points"] == len(validation)
    xs = [x for x, _ in drawn["train_loss"]["coords"]]
    ys = [y for _, y in drawn["train_loss"]["coords"]]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)  # one point per step, left to right
    # SVG y grows downwards: the curve ends lower on screen than it starts exactly when the loss fell.
    assert (ys[-1] > ys[0]) == (train[-1]["value"] < train[0]["value"])
    assert max(seen_points) == len(train)


def test_a_models_lineage_and_alias_history(browser, console_url, stack, dataset, registry):
    v1, v2 = registry["v1"], registry["v2"]
    open_view(browser, console_url, f"#/models/{v2['name']}/versions/{v2['version']}", stack.admin_key)
    lineage = wait(browser, lambda d: text(d, "#lineage"), message="the lineage")
    assert f"{NAME} v{dataset['version']}" in lineage
    assert registry["second_job"]["id"][:8] in lineage
    assert f"v{v1['version']}" in lineage  # trained from version 1
    links = browser.execute_script(
        "return [...document.querySelectorAll('#lineage a')].map((a) => a.getAttribute('href'))")
    assert f"#/jobs/{registry['second_job']['id']}" in links and f"#/datasets/{NAME}" in links

    open_view(browser, console_url, f"#/models/{v1['name']}", stack.admin_key)
    history = wait(browser, lambda d: d.execute_script("""
        const rows = document.querySelectorAll('[data-alias=production] .alias-history tbody tr');
        return [...rows].map((r) => [...r.cells].slice(1, 5).map((c) => c.textContent.trim()));"""),
        message="the alias history")
    assert [row[:2] for row in history] == [["(created)", f"v{v1['version']}"],
                                            [f"v{v1['version']}", f"v{v2['version']}"]]
    assert [row[3] for row in history] == ["first model", "fine-tuned"]
    assert cells(browser, "model-versions", f"v{v2['version']}")[5] == "production"


def test_a_models_evaluations_side_by_side(browser, console_url, stack, dataset, registry):
    client = stack.client()
    done = {}
    for label in ("v1", "v2"):
        ref = registry[label]
        submitted = client.call("POST", "/v1/evaluations", {
            "model": {"name": ref["name"], "version": ref["version"]},
            "dataset": {"name": NAME, "version": dataset["version"]}, "split": "test"})
        done[label] = wait_for(client, f"/v1/evaluations/{submitted['id']}", "SUCCEEDED", 300)
    name, v1, v2 = registry["v1"]["name"], registry["v1"]["version"], registry["v2"]["version"]

    # The version's page: its evaluations, with the figures the API reports (shown to 4 digits).
    open_view(browser, console_url, f"#/models/{name}/versions/{v2}", stack.admin_key)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#version-evaluations-table tbody tr"),
         message="the version's evaluations")
    row = cells(browser, "version-evaluations-table", done["v2"]["id"][:8])
    figures = done["v2"]["metrics"]
    assert row[1] == f"{NAME} v{dataset['version']} (test)" and row[2] == "SUCCEEDED", row
    assert float(row[3]) == pytest.approx(figures["loss"], rel=1e-3)
    assert int(row[7].replace(",", "")) == figures["tokens"]
    assert row[8].endswith(f"of {done['v2']['contamination']['documents']}"), row

    # The model's page: both versions in the table, and a loss-by-version chart with one point each.
    open_view(browser, console_url, f"#/models/{name}", stack.admin_key)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model-evaluations-chart svg path[data-series]"),
         message="the evaluation chart")
    series = browser.execute_script("""return [...document.querySelectorAll(
        '#model-evaluations-chart path[data-series]')].map((p) => [p.dataset.series, p.dataset.points]);""")
    assert series == [[f"{NAME} v{dataset['version']} (test)", "2"]]
    versions = browser.execute_script("""return [...document.querySelectorAll(
        '#model-evaluations-table tbody tr')].map((r) => r.cells[0].textContent.trim());""")
    assert sorted(versions) == [f"v{v1}", f"v{v2}"]
    for label in ("v1", "v2"):
        shown = browser.execute_script("""
            for (const r of document.querySelectorAll('#model-evaluations-table tbody tr'))
              if (r.cells[1].textContent.trim() === arguments[0]) return r.cells[4].textContent.trim();""",
                                       done[label]["id"][:8])
        assert float(shown) == pytest.approx(done[label]["metrics"]["loss"], rel=1e-3)


def _export_onnx(client, name: str, version: int, timeout: float = 300) -> None:
    """Export a version to ONNX and wait until READY: only READY exports can be deployed."""
    client.call("POST", f"/v1/models/{name}/versions/{version}/exports", {"format": "onnx"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exports = client.call("GET", f"/v1/models/{name}/versions/{version}")["exports"]
        state = next((e["state"] for e in exports if e["format"] == "onnx"), "")
        assert state != "FAILED", exports
        if state == "READY":
            return
        time.sleep(1)
    raise AssertionError(f"the ONNX export of {name} v{version} is not READY after {timeout:.0f}s")


def test_a_deployments_canary_weight(browser, console_url, stack, registry):
    v1, v2 = registry["v1"], registry["v2"]
    for version in (v1, v2):
        _export_onnx(stack.client(), version["name"], version["version"])
    body = {"model": v1["name"], "stable": v1["version"], "canary": {"version": v2["version"], "weight": 25}}
    stack.client().call("PUT", f"/v1/deployments/{DEPLOYMENT}", body, headers={"If-None-Match": "*"})
    open_view(browser, console_url, "#/deployments", stack.admin_key)
    row = wait(browser, lambda d: cells(d, "deployments-table", DEPLOYMENT), message="the deployment's row")
    assert row[3] == f"v{v1['version']}" and row[4] == f"v{v2['version']} at 25%"

    open_view(browser, console_url, f"#/deployments/{DEPLOYMENT}", stack.admin_key)
    weight = wait(browser, lambda d: d.execute_script(
        "return document.getElementById('canary-weight')?.dataset.weight"), message="the canary weight")
    assert weight == "25"
    shares = browser.execute_script("""
        return [...document.querySelectorAll('.split-bar span')]
          .map((s) => [s.className, s.getBoundingClientRect().width]);""")
    (stable_class, stable_width), (canary_class, canary_width) = shares
    assert (stable_class, canary_class) == ("stable", "canary")
    assert stable_width == pytest.approx(3 * canary_width, rel=0.05)  # 75% against 25%
    served = browser.execute_script("""
        return [...document.querySelectorAll('#served-versions tbody tr')]
          .map((r) => [...r.cells].slice(0, 3).map((c) => c.textContent.trim()));""")
    assert served == [["stable", f"v{v1['version']}", "75%"], ["canary", f"v{v2['version']}", "25%"]]

    # Serving figures per version, from the inference service's counters, once completions went through.
    wait_for(stack.client(), f"/v1/deployments/{DEPLOYMENT}", "READY", 300)
    completions = 12
    for i in range(completions):  # temperature > 0: every request reaches the inference service (no cache)
        stack.client().call("POST", "/v1/completions", {"model": DEPLOYMENT, "prompt": "The ", "max_tokens": 3,
                                                        "temperature": 0.8, "seed": i, "user": f"user-{i}"})
    figures = stack.client().call("GET", f"/v1/deployments/{DEPLOYMENT}/metrics")["versions"]
    assert sum(v["requests"] for v in figures) == completions

    def serving_rows(driver: WebDriver) -> list[list[str]] | None:
        rows = driver.execute_script("""
            return [...document.querySelectorAll('#serving-metrics tbody tr')].map((r) => [
              ...[...r.cells].map((c) => c.textContent.trim()), r.querySelector('.requests')?.dataset.value]);""")
        total = sum(int(row[-1] or 0) for row in rows)
        return rows if total == completions else None

    rows = wait(browser, serving_rows, timeout=30, message="the serving figures after the completions")
    columns = ["role", "version", "serving", "requests", "errors", "error_rate", "p50", "p99", "mean", "ttft",
               "prompt_tokens", "completion_tokens", "requests_value"]
    shown = {(row["role"], row["version"]): row for row in (dict(zip(columns, r, strict=True)) for r in rows)}
    assert set(shown) == {("stable", f"v{v1['version']}"), ("canary", f"v{v2['version']}")}
    for expected in figures:
        row = shown[(expected["role"], f"v{expected['version']}")]
        assert row["serving"] == f"{expected['weight']}%"
        assert int(row["requests_value"]) == expected["requests"]
        if expected["requests"]:
            assert row["errors"] == "0" and row["p50"].endswith(" ms") and row["ttft"].endswith(" ms")
            assert int(row["completion_tokens"].replace(",", "")) == expected["completion_tokens"] > 0
        else:
            assert row["p50"] == "—"
