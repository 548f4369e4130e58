"""ldm-serve against the unmodified PyPI client `webuiapi` (AUTOMATIC1111's API as clients speak it),
on a real uvicorn server started here: the images equal the pipeline's own for the same settings."""

import base64
import io
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import requests
from helpers import right_half, stroke_picture as picture
from PIL import Image

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")

from ldm.serve.app import ServerConfig, create_app  # noqa: E402

FIRST, SECOND = "tiny [0000000001]", "other [0000000002]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` on a free port, in a thread; `stop()` shuts it down as SIGTERM does."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def two_models(tiny_pipeline_dir, tmp_path_factory) -> dict:
    """title -> pipeline: the tiny pipeline, and another with other weights."""
    from ldm import LatentPipeline
    from helpers import make_tiny_pipeline

    other = make_tiny_pipeline(tmp_path_factory.mktemp("other") / "pipeline", seed=5)
    return {FIRST: LatentPipeline.from_pretrained(tiny_pipeline_dir, device="cpu"),
            SECOND: LatentPipeline.from_pretrained(other, device="cpu")}


@pytest.fixture(scope="module")
def pipes(tiny_pipeline_dir, tmp_path_factory):
    return two_models(tiny_pipeline_dir, tmp_path_factory)


def make_server(pipes, **overrides):
    calls = []

    def load(title):
        pipe = pipes[title]
        return pipe, title[-11:-1]

    config = ServerConfig(models={FIRST: "tiny", SECOND: "other"}, model=FIRST, **overrides)
    app = create_app(config, load=load)
    worker = app.state.worker
    original, submit, submitted = worker.call, worker.submit, []
    worker.call = lambda jobs: calls.append([len(j.prompts) for j in jobs]) or original(jobs)
    worker.submit = lambda job: submitted.append(job) or submit(job)  # what has reached the worker's queue
    server = Server(app)
    server.calls, server.submitted = calls, submitted
    return server


@pytest.fixture(scope="module")
def server(pipes):
    server = make_server(pipes)
    yield server
    server.stop()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(port=server.port)


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def lone(pipe, **kw) -> np.ndarray:
    return as_array(pipe(progress=False, **kw).images[0])


def test_txt2img_through_webuiapi_is_the_pipelines_image(api, pipes):
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=5, steps=3, width=64, height=64,
                         cfg_scale=6, sampler_name="Euler a", batch_size=2)
    assert [as_array(i).shape for i in result.images] == [(64, 64, 3)] * 2
    for i, image in enumerate(result.images):
        expected = lone(pipes[FIRST], prompt="a red circle", negative_prompt="blue", seed=5 + i, num_inference_steps=3,
                        guidance_scale=6, sampler="euler_a")
        assert np.abs(as_array(image).astype(int) - expected).max() <= 1  # drawn as a batch of 2: float rounding
        assert image.info["parameters"] == result.info["infotexts"][i]
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "euler_a"
    assert "Sampler: euler_a" in result.info["infotexts"][0] and result.info["sd_model_name"] == "tiny"


def test_inpainting_through_webuiapi_is_the_pipelines_image(api, pipes):
    kw = dict(mask_blur=2, inpainting_fill=1, inpaint_full_res=False, denoising_strength=0.8)
    result = api.img2img(images=[picture()], mask_image=right_half(), prompt="a red circle", seed=9, steps=4,
                         width=64, height=64, cfg_scale=7, sampler_name="DDIM", eta=0, **kw)
    expected = lone(pipes[FIRST], prompt="a red circle", image=picture(), mask_image=right_half(), seed=9,
                    num_inference_steps=4, guidance_scale=7, sampler="ddim", mask_blur=2, strength=0.8,
                    height=64, width=64)
    assert np.array_equal(as_array(result.images[0]), expected)
    assert np.array_equal(as_array(result.images[0])[:, :24], as_array(picture())[:, :24])  # kept, bit for bit
    assert "Mask blur: 2" in result.info["infotexts"][0]


def test_samplers_models_options_and_png_info(api, server):
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    assert api.util_get_model_names() == sorted([FIRST, SECOND])
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    api.util_set_model("other")  # webuiapi's own helper: picks the closest title, sets it through /options
    try:
        assert api.util_get_current_model() == SECOND
        result = api.txt2img(prompt="a red circle", seed=1, steps=2, width=64, height=64)
        assert result.info["sd_model_name"] == "other"
    finally:
        api.set_options({"sd_model_checkpoint": FIRST})
    info = api.png_info(result.images[0])
    assert info.info == result.info["infotexts"][0]
    assert info.parameters["Seed"] == "1" and info.parameters["Prompt"] == "a red circle"


def test_requests_queued_together_share_calls_and_keep_their_images(pipes):
    server = make_server(pipes)
    try:
        worker = server.app.state.worker
        body = dict(prompt="a blue square", steps=3, width=64, height=64, sampler_name="Euler")
        with worker.lock:  # hold the worker so that all eight queue up behind the first
            threads, answers = [], {}
            for seed in range(8):
                def send(seed=seed):
                    answers[seed] = requests.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "seed": seed})
                threads.append(threading.Thread(target=send))
                threads[-1].start()
            while len(server.submitted) < 8:  # all queued (the worker may hold some, waiting for the lock)
                time.sleep(0.02)
        for t in threads:
            t.join()
        assert len(server.calls) <= 3 and sum(map(sum, server.calls)) == 8  # batched across requests
        for seed, answer in answers.items():
            image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
            alone = lone(pipes[FIRST], prompt="a blue square", seed=seed, num_inference_steps=3, sampler="euler",
                         guidance_scale=7)  # A1111's default cfg_scale
            # equal up to float rounding (another batch size, other kernel blocking): one 8-bit level at most
            assert np.abs(as_array(image).astype(int) - alone).max() <= 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    "body, status, message",
    [
        (dict(enable_hr=True), 422, "enable_hr: True is not supported"),
        (dict(sampler_name="Restart"), 404, "Sampler not found: Restart"),
        (dict(steps=1000), 422, r"steps: 1000 is outside \[1, 150\]"),
        (dict(batch_size=8, n_iter=4), 422, "32 images, more than the limit of 16"),
        (dict(width=4096, height=4096), 422, "width: 4096 is outside"),
        (dict(styles=["cinematic"]), 422, "styles: not supported"),
        (dict(override_settings={"sd_vae": "x"}), 422, "override_settings: 'sd_vae' is not supported"),
        (dict(override_settings={"sd_model_checkpoint": "../../etc"}), 404, "no model '../../etc'"),
        (dict(prompt=3), 422, "prompt: expected a string"),
        (dict(resize_mode=2), 422, "resize_mode: 2 is not supported"),
    ],
)
def test_bad_requests_are_4xx_naming_the_field(server, body, status, message):
    import re

    answer = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64, **body})
    assert answer.status_code == status and re.search(message, answer.json()["detail"]), answer.text


def test_bad_pictures_are_422_and_never_fetched(server):
    url = f"{server.url}/sdapi/v1/img2img"
    base = dict(prompt="x", steps=2, width=64, height=64)
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 Mpx: over the 1 Mpx limit
    cases = [(["http://169.254.169.254/latest"], "URLs are not fetched"), (["not base64!"], "not valid base64"),
             ([base64.b64encode(bomb.getvalue()).decode()], "too many pixels"), ([], "init_images: expected")]
    for pictures, message in cases:
        answer = requests.post(url, json={**base, "init_images": pictures})
        assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    prefixed = "data:image/png;base64," + base64.b64encode(png(picture())).decode()
    assert requests.post(url, json={**base, "init_images": [prefixed]}).status_code == 200
    assert requests.post(url, data=b"{not json", headers={"content-type": "application/json"}).status_code == 400


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_auth_body_limit_and_a_full_queue(pipes):
    server = make_server(pipes, auth=("alice", "secret"), max_body=4096, max_queue=1)
    try:
        url = f"{server.url}/sdapi/v1/txt2img"
        body = dict(prompt="x", steps=2, width=64, height=64)
        assert requests.post(url, json=body).status_code == 401
        assert requests.post(url, json=body, auth=("alice", "wrong")).status_code == 401
        assert requests.post(url, json=body, auth=("alice", "secret")).status_code == 200
        assert requests.post(url, json={**body, "prompt": "x" * 5000}, auth=("alice", "secret")).status_code == 413
        api = webuiapi.WebUIApi(port=server.port, username="alice", password="secret")
        assert api.get_progress()["state"]["job_count"] == 0
        worker, entered, release = server.app.state.worker, threading.Event(), threading.Event()
        call = worker.call

        def held(jobs):  # the worker busy with the first request until released
            entered.set()
            release.wait(30)
            return call(jobs)

        worker.call = held
        post = dict(json=body, auth=("alice", "secret"))
        first = threading.Thread(target=requests.post, args=(url,), kwargs=post)
        first.start()
        entered.wait(30)
        waiting = threading.Thread(target=requests.post, args=(url,), kwargs=post)  # one may wait ...
        waiting.start()
        while worker.queue.qsize() < 1:
            time.sleep(0.02)
        full = requests.post(url, **post)  # ... the next is refused, not queued without bound
        release.set()
        assert full.status_code == 503 and "queue is full" in full.json()["detail"]
        first.join()
        waiting.join()
    finally:
        server.stop()


def test_interrupt_stops_the_running_job_at_the_next_step(server, api):
    answer = {}
    body = dict(prompt="a red circle", steps=150, width=64, height=64, seed=3)
    url = f"{server.url}/sdapi/v1/txt2img"
    thread = threading.Thread(target=lambda: answer.update(r=requests.post(url, json=body)))
    thread.start()
    while api.get_progress()["state"]["sampling_step"] < 2:
        time.sleep(0.01)
    progress = api.get_progress()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    api.interrupt()
    thread.join(timeout=60)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
    assert api.get_progress()["state"]["interrupted"]


def test_listen_without_auth_refuses_to_start(capsys):
    from ldm.cli.serve import main

    with pytest.raises(SystemExit) as e:
        main(["--listen", "--port", str(free_port())])
    assert e.value.code == 2 and "pass --api-auth USER:PASS" in capsys.readouterr().err


def test_models_resolve_only_inside_the_models_dir(tiny_pipeline_dir, tmp_path):
    from ldm.cli.serve import find_models

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_pipeline_dir, models / "mine")
    outside = shutil.copytree(tiny_pipeline_dir, tmp_path / "elsewhere")
    (models / "sneaky").symlink_to(outside)
    (models / "notes").mkdir()
    with pytest.warns(UserWarning, match="sneaky links outside the folder; skipped"):
        found = find_models(models)
    names = sorted(title.rsplit(" [", 1)[0] for title in found)
    assert names == ["default-model", "mine"]
    digest = __import__("hashlib").sha256((models / "mine/unet/diffusion_pytorch_model.safetensors").read_bytes())
    assert f"mine [{digest.hexdigest()[:10]}]" in found


def test_32_concurrent_requests_8_malformed(server, pipes):
    """Every valid request gets its own image; every malformed one a 4xx; the server lives on."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    good = [dict(prompt="a red circle", seed=100 + i, steps=2, width=64, height=64, sampler_name="Euler")
            for i in range(24)]
    bad = [dict(steps=-1), dict(width="wide"), dict(sampler_name="Nope"), dict(enable_hr=True),
           dict(prompt=["a", "b"]), dict(batch_size=1000), dict(seed="s"), dict(cfg_scale=float("nan"))]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def send(body):
        if body.get("cfg_scale") != body.get("cfg_scale"):  # NaN is not JSON: send what a broken client would
            return requests.post(f"{server.url}/sdapi/v1/txt2img", data=b'{"cfg_scale": NaN}',
                                 headers={"content-type": "application/json"})
        return requests.post(f"{server.url}/sdapi/v1/txt2img", json=body)

    bodies = good[:12] + bad + good[12:]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, bodies))
    for body, answer in zip(bodies, answers):
        if body in bad:
            assert 400 <= answer.status_code < 500, (body, answer.text)
            continue
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        alone = lone(pipes[FIRST], prompt="a red circle", seed=body["seed"], num_inference_steps=2, sampler="euler",
                     guidance_scale=7)
        assert np.abs(as_array(image).astype(int) - alone).max() <= 1
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB, the whole test process
    assert grown < 200 * 1024, f"memory grew by {grown / 1024:.0f} MiB"


def test_sigterm_answers_the_queue_finishes_the_running_job_and_exits_0(tiny_pipeline_dir, tmp_path):
    import signal
    import subprocess
    import sys

    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_pipeline_dir, models / "tiny")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ldm.cli.serve", "--models-dir", str(models), "--model", "tiny",
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/sdapi/v1"
        for _ in range(600):
            try:
                requests.get(f"{url}/progress", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        answers = {}
        long = dict(prompt="a red circle", steps=100, width=64, height=64, seed=1)
        queued = dict(long, steps=2, width=128)  # another size: it cannot share the running call
        runner = threading.Thread(target=lambda: answers.update(first=requests.post(f"{url}/txt2img", json=long)))
        runner.start()
        while requests.get(f"{url}/progress").json()["state"]["sampling_step"] < 1:
            time.sleep(0.02)
        waiter = threading.Thread(target=lambda: answers.update(second=requests.post(f"{url}/txt2img", json=queued)))
        waiter.start()
        while requests.get(f"{url}/progress").json()["state"]["job_count"] < 2:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        runner.join(60)
        waiter.join(60)
        assert process.wait(60) == 0
        assert answers["first"].status_code == 200 and len(answers["first"].json()["images"]) == 1
        assert answers["second"].status_code == 503 and "shutting down" in answers["second"].json()["detail"]
    finally:
        process.kill()


def test_lora_tags_in_prompts_apply_to_their_request_alone(server, pipes, tiny_pipeline_dir, tmp_path):
    from helpers import make_lora_file

    make_lora_file(tiny_pipeline_dir, tmp_path / "ink.safetensors")
    pipe = pipes[FIRST]
    pipe.lora_dir = tmp_path
    try:
        body = dict(steps=3, width=64, height=64, seed=4, sampler_name="Euler")
        answers = {p: requests.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "prompt": p})
                   for p in ("a red circle <lora:ink:0.7>", "a red circle")}  # the tagged one first
        for prompt, answer in answers.items():
            image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
            alone = lone(pipe, prompt=prompt, seed=4, num_inference_steps=3, sampler="euler", guidance_scale=7)
            assert np.abs(as_array(image).astype(int) - alone).max() <= 1, prompt
        assert "Lora hashes" in json.loads(answers["a red circle <lora:ink:0.7>"].json()["info"])["infotexts"][0]
    finally:
        pipe.lora_dir = None


def test_requests_with_other_lora_tags_are_not_drawn_together():
    from ldm.serve.a1111 import Limits, parse_request

    jobs = [parse_request("txt2img", {"prompt": p, "seed": 1}, Limits(), []) for p in
            ("a <lora:ink:1>", "a <lora:ink:0.5>", "b <lora:ink:1>", "a")]
    assert jobs[0].key == jobs[2].key and len({jobs[0].key, jobs[1].key, jobs[3].key}) == 3
