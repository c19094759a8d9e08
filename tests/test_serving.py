"""Serving: registered models that do their job (MLflow pyfunc, `mlflow models serve`) and the
`unclip serve` application, on tiny random models registered in a store of the test's own (no
pipeline run: seconds, not minutes)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import free_port, wait_http

from bench.serving import register_tiny  # noqa: E402  (tiny random models, registered)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("serve")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    uri = register_tiny(root)
    os.environ["UNCLIP_CACHE_DIR"] = str(root / "cache")
    yield {"root": root, "uri": uri}
    mlflow.set_tracking_uri(before)
    os.environ.pop("UNCLIP_CACHE_DIR", None)


def _png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    assert img.format == "PNG"
    return img


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_cascade_pyfunc_generates_pngs(tiny_store):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/unclip@champion")
    out = model.predict(pd.DataFrame([{"prompt": "a red circle"}]))
    assert list(out.columns) == ["prompt", "seed", "index", "image", "width", "height"]
    assert len(out) == 1 and _png(out["image"][0]).size == (128, 128)
    # several images, a seed and overrides; the same seed gives the same images
    req = pd.DataFrame([{"prompt": "a blue square", "seed": 3, "num_images": 2, "decoder_steps": 1,
                         "upsample": False}])
    a, b = model.predict(req), model.predict(req)
    assert len(a) == 2 and [_png(x).size for x in a["image"]] == [(8, 8), (8, 8)]
    assert list(a["image"]) == list(b["image"]) and a["image"][0] != a["image"][1]
    # the signature names the inputs; bad values are the caller's error
    sig = model.metadata.get_input_schema()
    assert {"prompt", "seed", "num_images", "decoder_guidance"} <= set(sig.input_names())
    from mlflow.exceptions import MlflowException

    for bad in ({"prompt": ""}, {"prompt": "x", "num_images": 99}, {"prompt": "x" * 5000}):
        with pytest.raises(MlflowException):
            model.predict(pd.DataFrame([bad]))


def test_stage_pyfuncs_do_their_jobs(tiny_store):
    import mlflow

    load = lambda name: mlflow.pyfunc.load_model(f"models:/{name}@champion")  # noqa: E731
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    clip = load("unclip-clip").predict(pd.DataFrame([{"caption": "a red circle"}, {"image": _b64(image)}]))
    assert len(clip["text_embedding"][0]) == 16 and clip["image_embedding"][0] is None
    assert abs(np.linalg.norm(clip["image_embedding"][1]) - 1) < 1e-5
    z = load("unclip-prior").predict(pd.DataFrame([{"caption": "a red circle", "seed": 1}]))
    z_i = np.asarray(z["image_embedding"][0])
    assert z_i.shape == (16,) and abs(np.linalg.norm(z_i) - 1) < 1e-4
    dec = load("unclip-decoder").predict(pd.DataFrame([{"image_embedding": z_i.tolist(),
                                                         "caption": "a red circle"}]))
    base = _png(dec["image"][0])
    assert base.size == (8, 8)
    up = load("unclip-upsampler1").predict(pd.DataFrame([{"image": dec["image"][0]}]))
    assert _png(up["image"][0]).size == (32, 32)
    sig = mlflow.models.get_model_info("models:/unclip-decoder@champion").signature
    assert "image_embedding" in sig.inputs.input_names() and sig.outputs.input_names() == ["image"]


def _wait_alive(proc, url: str, log: Path, timeout: float = 240) -> None:
    """wait_http, failing at once with the log's tail if the server process exits."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            wait_http(url, timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise


@pytest.mark.slow  # starts a server process (make test-fast leaves it out)
def test_mlflow_models_serve_answers_invocations(tiny_store, tmp_path):
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    # mlflow runs `uvicorn` from PATH: the virtual environment's own
    env = {**os.environ, "MLFLOW_TRACKING_URI": tiny_store["uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", "models:/unclip@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        _wait_alive(proc, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log")
        body = json.dumps({"dataframe_records": [{"prompt": "a red circle"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())
        rows = answer["predictions"]
        assert len(rows) == 1 and _png(rows[0]["image"]).size == (128, 128)
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"dataframe_records": [{"prompt": ""}]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=60)
        assert 400 <= err.value.code < 500
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


# ---- unclip serve (Ray Serve) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_store, ray_local):
    from ray import serve

    from unclip.generation import ModelRefs
    from unclip.serving.app import Limits, build_app, start

    port = free_port()
    limits = Limits(max_prompt_chars=100, max_images=4, max_frames=4, max_steps=10,
                    max_upload_bytes=64 * 1024)
    app = build_app(ModelRefs.registered("champion"), tiny_store["uri"], limits, replicas=1,
                    max_batch_size=8, batch_wait_s=0.1)
    start(app, "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=180)
    yield url
    serve.shutdown()


def _post(url: str, body, timeout: float = 120) -> tuple[int, dict | bytes, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, headers = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        raw, status, headers = err.read(), err.code, dict(err.headers)
    ctype = headers.get("content-type", headers.get("Content-Type", ""))
    return status, (json.loads(raw) if "json" in ctype else raw), headers


FAST = {"prior_steps": 1, "decoder_steps": 1, "upsample": False}


def test_serve_answers_16_concurrent_requests_batched(served):
    from concurrent.futures import ThreadPoolExecutor

    with urllib.request.urlopen(f"{served}/health", timeout=10) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["resolution"] == 8

    def one(i):
        return _post(f"{served}/generate", {"prompt": f"a red circle number {i}", "seed": i, **FAST})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert [status for status, _, _ in answers] == [200] * 16, answers[0][1]
    ids = {body["request_id"] for _, body, _ in answers}
    assert len(ids) == 16 and all(h.get("x-request-id") or h.get("X-Request-Id") for _, _, h in answers)
    assert all(_png(body["images"][0]).size == (8, 8) for _, body, _ in answers)
    assert max(body["batch"] for _, body, _ in answers) > 1  # concurrent requests shared batches
    # a request's images follow its own seed: batched with others, they are those it gets alone
    for i in (0, 5, 15):
        alone = _post(f"{served}/generate", {"prompt": f"a red circle number {i}", "seed": i,
                                             "batch": False, **FAST})[1]
        assert alone["batch"] == 1
        x, y = (np.asarray(_png(b["images"][0]), np.int16) for b in (alone, answers[i][1]))
        assert np.abs(x - y).max() <= 4, i  # float rounding of the larger batch at most


def test_serve_vary_interpolate_edit_and_png(served):
    image = _b64(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    status, body, _ = _post(f"{served}/vary", {"image": image, "num_images": 2, **FAST})
    assert status == 200 and len(body["images"]) == 2
    status, body, _ = _post(f"{served}/interpolate", {"image_a": image, "image_b": image, "frames": 3, **FAST})
    assert status == 200 and len(body["images"]) == 3
    status, body, _ = _post(f"{served}/edit", {"image": image, "from": "a red circle", "to": "a blue circle",
                                               "frames": 2, **FAST})
    assert status == 200 and len(body["images"]) == 2
    status, raw, headers = _post(f"{served}/generate", {"prompt": "a red circle", "format": "png",
                                                        "prior_steps": 1, "decoder_steps": 1})
    assert status == 200 and Image.open(io.BytesIO(raw)).size == (128, 128)


@pytest.mark.parametrize("route, body, status, words", [
    ("generate", b"{not json", 400, "not valid JSON"),
    ("generate", [1, 2], 400, "JSON object"),
    ("generate", {}, 422, "prompt"),
    ("generate", {"prompt": "   "}, 422, "prompt"),
    ("generate", {"prompt": "x" * 101}, 422, "more than the limit"),
    ("generate", {"prompt": "a red circle", "num_images": 99}, 422, "num_images"),
    ("generate", {"prompt": "a red circle", "decoder_steps": 1000}, 422, "decoder_steps"),
    ("generate", {"prompt": "a red circle", "seed": "one"}, 422, "seed"),
    ("generate", {"prompt": "a red circle", "sampler": "euler"}, 422, "sampler"),
    ("generate", {"prompt": "x", "junk": "y" * 70000}, 413, "limit"),
    ("vary", {"image": "%%% not base64"}, 422, "base64"),
    ("vary", {"image": base64.b64encode(b"not an image").decode()}, 422, "readable"),
    ("interpolate", {"image_a": "", "image_b": ""}, 422, "image_a"),
    ("edit", {"image": "", "from": "a", "to": "b"}, 422, "image"),
])
def test_serve_refuses_bad_requests_with_4xx(served, route, body, status, words):
    got, answer, headers = _post(f"{served}/{route}", body)
    assert got == status, answer
    assert words in answer["error"] and answer["request_id"]


def test_serve_keeps_answering_after_bad_requests(served):
    for body in (b"{", {"prompt": ""}, {"prompt": "x", "junk": "y" * 70000}):
        assert 400 <= _post(f"{served}/generate", body)[0] < 500
    status, body, _ = _post(f"{served}/generate", {"prompt": "a green star", **FAST})
    assert status == 200 and len(body["images"]) == 1
    with urllib.request.urlopen(f"{served}/health", timeout=10) as resp:
        assert json.loads(resp.read())["served"] >= 1


def test_evaluate_registers_the_cascade_by_version(tiny_store):
    """The evaluate stage registers `unclip` from the stage models' registered versions; a better
    CLIP score takes champion, and the new version names the versions, not the aliases."""
    import mlflow
    from mlflow import MlflowClient

    from stages.evaluate import register

    class Ctx:
        def input(self, stage, output):
            assert output == "registered"
            name = {"upsample1": "upsampler1", "upsample2": "upsampler2"}.get(stage, stage)
            return f"models:/unclip-{name}@champion"

    with mlflow.start_run():
        version, alias = register(Ctx(), 0.5)
    assert alias == "champion" and version != "1"
    tags = MlflowClient().get_model_version("unclip", version).tags
    assert tags["unclip.model.prior"] == "models:/unclip-prior/1"
    with mlflow.start_run():
        assert register(Ctx(), 0.1)[1] == "candidate"


@pytest.mark.slow  # starts a server process (make test-fast leaves it out)
def test_unclip_serve_command_serves_the_run_models(tiny_store, tmp_path):
    """`unclip serve` as a user starts it: its own local Ray, the run directory's store, loopback."""
    import signal
    import time

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    log_path = tmp_path / "unclip-serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "unclip"), "serve", "--run-dir",
                             str(tiny_store["root"]), "--port", str(port), "--num-cpus", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_alive(proc, f"http://127.0.0.1:{port}/health", log_path)
        status, body, headers = _post(f"http://127.0.0.1:{port}/generate",
                                      {"prompt": "a red circle", "num_images": 2, **FAST})
        assert status == 200 and len(body["images"]) == 2 and body["request_id"]
        assert _post(f"http://127.0.0.1:{port}/generate", {"prompt": ""})[0] == 422
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        time.sleep(1)
        log.close()


def _chromium():
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make browser)")
    return binary, driver


def test_web_page_generates_in_a_real_browser(served, tmp_path):
    """The page in headless Chromium (Debian's, through its chromedriver; nothing downloaded): a
    prompt gives an image grid, "variations" on an image replaces it; a screenshot is kept in
    test-artifacts/ (UNCLIP_TEST_ARTIFACTS)."""
    binary, driver_path = _chromium()
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        browser.get(served + "/")
        assert browser.title == "unclip"
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a blue square")
        for key, value in (("num_images", "3"), ("decoder_steps", "1"), ("prior_steps", "1"), ("seed", "5")):
            field = browser.find_element(By.ID, key)
            field.clear()
            field.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "img.result")) == 3)
        status = browser.find_element(By.ID, "status").text
        assert "3 image(s)" in status and "request" in status
        sizes = browser.execute_script(
            "return [...document.querySelectorAll('img.result')].map(i => i.naturalWidth)")
        assert sizes == [128, 128, 128]
        artifacts = Path(os.environ.get("UNCLIP_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(artifacts / "serve-page.png"))
        first = browser.find_element(By.CSS_SELECTOR, "img.result").get_attribute("src")
        browser.find_element(By.CSS_SELECTOR, "button.vary").click()
        wait.until(lambda b: "variations:" in b.find_element(By.ID, "status").text
                   and "working" not in b.find_element(By.ID, "status").text)
        assert "variation of" in browser.find_element(By.TAG_NAME, "figcaption").text
        assert browser.find_element(By.CSS_SELECTOR, "img.result").get_attribute("src") != first
        assert (artifacts / "serve-page.png").stat().st_size > 1000
    finally:
        browser.quit()
