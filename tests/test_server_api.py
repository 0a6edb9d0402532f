"""The A1111-compatible API of `minisd serve`, over real HTTP: one server in a subprocess on a
free 127.0.0.1 port for the module (the embedded 64x64 minisd-shapes model, on the CPU in
float32 so that its images can be compared with a Pipeline in this process), every request
with a timeout, the server stopped at the end (server_harness checks it stops cleanly).

Run with -s to see the measured times (start, first image, three concurrent requests)."""
import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from server_harness import decode_body, running_server  # tests/ is on sys.path

MODEL = Path(__file__).resolve().parent.parent / "weights" / "minisd-shapes"
NATIVE = 64  # minisd-shapes' image size
MAX_STEPS, MAX_IMAGES = 20, 4
TIMEOUT = 60  # seconds for any one request
PIXEL_TOLERANCE = 1  # max |difference| in 8-bit levels between the API's image and the Pipeline's
PROMPT = "a red circle on a blue background"
MEASURED = {}


@pytest.fixture(scope="module")
def server():
    started = time.perf_counter()
    with running_server("--model", str(MODEL), "--device", "cpu", "--dtype", "float32",
                        "--max-steps", str(MAX_STEPS), "--max-images", str(MAX_IMAGES)) as handle:
        MEASURED["server start to first 200 on /options (s)"] = time.perf_counter() - started
        yield handle
    print("\n" + "\n".join(f"{name}: {value:.2f}" for name, value in MEASURED.items()))


def post(server, path, payload, timeout=TIMEOUT):
    return server.post_json(path, payload, timeout=timeout)


def post_raw(server, path, data: bytes, timeout=TIMEOUT):
    status, headers, body = server.request("POST", path, data, {"Content-Type": "application/json"}, timeout)
    return status, decode_body(headers, body)


def generated(server, payload, path="/sdapi/v1/txt2img"):
    """(PNG bytes of each image, info) of a request that must succeed."""
    status, body = post(server, path, payload)
    assert status == 200, body
    return [base64.b64decode(image) for image in body["images"]], json.loads(body["info"])


def decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def png_b64(size, color=(200, 40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def txt2img(**fields):
    return {"prompt": PROMPT, "steps": 4, "seed": 11, **fields}


def test_txt2img_images_info_and_parameters(server):
    started = time.perf_counter()
    pngs, info = generated(server, txt2img(negative_prompt="green"))
    MEASURED.setdefault("first image through the API (s)", time.perf_counter() - started)
    assert len(pngs) == 1
    image = decoded(pngs[0])
    assert image.format == "PNG" and image.size == (NATIVE, NATIVE) and image.mode == "RGB"
    assert info["seed"] == 11 and info["all_seeds"] == [11]
    assert info["infotexts"] == [image.info["parameters"]]
    assert image.info["parameters"] == (f"{PROMPT}\nNegative prompt: green\nSteps: 4, Sampler: DPM++ 2M, "
                                        f"CFG scale: 7, Seed: 11, Size: 64x64, Model: minisd-shapes")
    assert info["width"] == info["height"] == NATIVE and info["steps"] == 4 and info["cfg_scale"] == 7.0
    assert info["all_prompts"] == [PROMPT] and info["all_negative_prompts"] == ["green"]
    assert info["version"].startswith("minisd ") and info["sd_model_name"] == "minisd-shapes"
    assert info["warnings"] == [] and info["nsfw_content_detected"] == [False]
    assert info["index_of_first_image"] == 0 and info["clip_skip"] == 1
    # the same request again: the same bytes
    assert generated(server, txt2img(negative_prompt="green"))[0] == pngs


def test_parameters_echo_the_request_as_understood(server):
    status, body = post(server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2})
    assert status == 200
    assert body["parameters"] == {"prompt": "x", "negative_prompt": "", "seed": -1, "steps": 2, "cfg_scale": 7.0,
                                  "width": 64, "height": 64, "batch_size": 1, "n_iter": 1,
                                  "sampler_name": "DPM++ 2M", "clip_skip": 1, "override_settings": {}}


def test_batches_get_consecutive_seeds(server):
    pngs, info = generated(server, txt2img(seed=100, batch_size=2, n_iter=2))
    assert info["all_seeds"] == [100, 101, 102, 103] and info["seed"] == 100
    assert [f"Seed: {s}," in text for s, text in zip(range(100, 104), info["infotexts"])] == [True] * 4
    assert [decoded(png).info["parameters"] for png in pngs] == info["infotexts"]
    assert len(set(pngs)) == 4
    # image 2 is the first of the second n_iter batch: the same as a request starting at its seed,
    # to the rounding of a batch of 2 against a batch of 1 (oneDNN's kernels may differ by batch
    # size: 1 level measured on one of this project's CPUs, bit-equal on another), and far from
    # the neighbouring seeds' images
    alone = np.asarray(decoded(generated(server, txt2img(seed=102))[0][0]), dtype=int)
    gaps = [np.abs(alone - np.asarray(decoded(png), dtype=int)).max() for png in pngs]
    assert gaps[2] <= PIXEL_TOLERANCE and min(gaps[1], gaps[3]) > 10 * PIXEL_TOLERANCE, gaps


def test_random_seed_is_reported_and_reproducible(server):
    pngs, info = generated(server, txt2img(seed=-1))
    seed = info["seed"]
    assert seed >= 0 and info["all_seeds"] == [seed] and f"Seed: {seed}," in info["infotexts"][0]
    assert generated(server, txt2img(seed=seed))[0] == pngs


def test_same_image_as_the_pipeline(server):
    from minisd import Pipeline

    pngs, _ = generated(server, txt2img(seed=5, steps=6, cfg_scale=6.5, negative_prompt="(blue:1.2)"))
    pipe = Pipeline.from_pretrained(str(MODEL))
    out = pipe(PROMPT, negative_prompt="(blue:1.2)", num_inference_steps=6, guidance_scale=6.5,
               generator=torch.Generator().manual_seed(5), prompt_syntax="a1111")
    ours = np.asarray(decoded(pngs[0]), dtype=np.int16)
    theirs = np.asarray(out.images[0], dtype=np.int16)
    assert np.abs(ours - theirs).max() <= PIXEL_TOLERANCE


def test_img2img_keeps_the_image_size(server):
    request = {"prompt": PROMPT, "steps": 6, "seed": 3, "denoising_strength": 0.5,
               "init_images": ["data:image/png;base64," + png_b64((70, 45))]}
    pngs, info = generated(server, request, "/sdapi/v1/img2img")
    image = decoded(pngs[0])
    assert image.size == (70, 45) and info["width"] == 70 and info["height"] == 45
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
    # without the data: prefix, the same image
    request["init_images"] = [png_b64((70, 45))]
    assert generated(server, request, "/sdapi/v1/img2img")[0] == pngs
    # width and height resize it
    resized, _ = generated(server, {**request, "width": 64, "height": 48}, "/sdapi/v1/img2img")
    assert decoded(resized[0]).size == (64, 48)


def test_clip_skip(server):
    plain, _ = generated(server, txt2img())
    skipped, info = generated(server, txt2img(override_settings={"CLIP_stop_at_last_layers": 2}))
    assert skipped != plain
    assert info["clip_skip"] == 2 and info["infotexts"][0].endswith(", Clip skip: 2")
    assert generated(server, txt2img(clip_skip=2))[0] == skipped  # stable-diffusion.cpp's field


def test_samplers_and_unknown_fields(server):
    plain, _ = generated(server, txt2img())
    pngs, info = generated(server, txt2img(sampler_name="Euler a"))
    assert pngs == plain and len(info["warnings"]) == 1 and "Euler a" in info["warnings"][0]
    for name in ({"sampler_index": "DPM++ 2M"}, {"sampler_name": "k_dpmpp_2m"}, {"sampler_name": "dpm++ 2m"}):
        assert generated(server, txt2img(**name))[1]["warnings"] == []
    extra = {"styles": [], "subseed": -1, "do_not_save_grid": True, "enable_hr": False, "alwayson_scripts": {},
             "something_new": {"nested": [1, 2]}, "save_images": False}
    pngs, info = generated(server, txt2img(**extra))
    assert pngs == plain and info["warnings"] == []
    _, info = generated(server, txt2img(enable_hr=True))
    assert any("enable_hr" in warning for warning in info["warnings"])
    status, body = post(server, "/sdapi/v1/txt2img", txt2img(send_images=False))
    assert status == 200 and body["images"] == [] and json.loads(body["info"])["all_seeds"] == [11]
    # JavaScript's whole numbers as floats
    assert generated(server, txt2img(steps=4.0, seed=11.0, width=64.0))[0] == plain


def test_three_concurrent_requests(server):
    started = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda seed: post(server, "/sdapi/v1/txt2img", txt2img(seed=seed, steps=10)),
                                (21, 22, 23)))
    MEASURED["three concurrent requests, 10 steps each (s)"] = time.perf_counter() - started
    for seed, (status, body) in zip((21, 22, 23), answers):
        assert status == 200, body
        assert json.loads(body["info"])["all_seeds"] == [seed]
    assert len({body["images"][0] for _, body in answers}) == 3


LONG = {"prompt": PROMPT, "steps": MAX_STEPS, "n_iter": MAX_IMAGES, "width": 2 * NATIVE, "height": 2 * NATIVE}


def wait_for_progress(server, deadline_s=30) -> dict:
    """The first /progress answer that shows a job past its first step."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        status, answer = server.get("/sdapi/v1/progress", timeout=10)
        assert status == 200
        if answer["state"]["sampling_step"] > 0:
            return answer
        time.sleep(0.01)
    raise AssertionError("no job made progress")


def test_progress_and_interrupt(server):
    status, idle = server.get("/sdapi/v1/progress")
    assert status == 200 and idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert idle["current_image"] is None and set(idle["state"]) >= {"job", "job_no", "sampling_steps", "skipped"}
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(post, server, "/sdapi/v1/txt2img", LONG)
        answer = wait_for_progress(server)
        assert 0 < answer["progress"] < 1 and answer["eta_relative"] >= 0
        state = answer["state"]
        assert state["job_count"] >= 1 and state["sampling_steps"] == MAX_STEPS and state["job"] == "txt2img"
        assert 0 <= state["job_no"] < MAX_IMAGES and len(state["job_timestamp"]) == 14
        assert post(server, "/sdapi/v1/interrupt", {}) == (200, {})
        status, body = long.result(timeout=TIMEOUT)
    assert status == 409 and body["error"] == "Interrupted"


def test_client_that_leaves_does_not_stall_the_queue(server):
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_for_progress(server)["state"]["job_no"] == 0  # in the first of its MAX_IMAGES batches
    # Cancelled at its next step, the job never gets far into its n_iter batches; the queue empties.
    deadline = time.monotonic() + 30
    while (state := server.get("/sdapi/v1/progress", timeout=10)[1]["state"])["job_count"]:
        assert state["job_no"] <= 1, "the job ran on after its client left"
        assert time.monotonic() < deadline, "the queue still runs the job of a client that left"
        time.sleep(0.01)
    assert generated(server, txt2img(steps=2))[1]["all_seeds"] == [11]


def test_model_sampler_and_option_lists(server):
    assert server.get("/sdapi/v1/sd-models") == (200, [{
        "title": "minisd-shapes", "model_name": "minisd-shapes", "hash": None, "sha256": None,
        "filename": str(MODEL), "config": None}])
    assert server.get("/sdapi/v1/samplers") == (200, [{"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {}}])
    status, options = server.get("/sdapi/v1/options")
    assert status == 200 and options["sd_model_checkpoint"] == "minisd-shapes"
    assert options["CLIP_stop_at_last_layers"] == 1
    assert post(server, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "x"}) == (200, None)
    assert server.get("/sdapi/v1/options")[1] == options


NOT_AN_IMAGE = base64.b64encode(b"hello, not a picture").decode()
BAD_REQUESTS = [  # (path, body: bytes or JSON-able, status, field)
    ("txt2img", b'{"prompt": "x",', 400, "body"),
    ("txt2img", b"", 400, "body"),
    ("txt2img", b'{"steps": NaN}', 400, "body"),
    ("txt2img", b"\xff\xfe{", 400, "body"),
    ("txt2img", [1, 2], 422, "body"),
    ("txt2img", "prompt", 422, "body"),
    ("txt2img", {"prompt": ["a", "b"]}, 422, "prompt"),
    ("txt2img", {"negative_prompt": 3}, 422, "negative_prompt"),
    ("txt2img", {"steps": "20"}, 422, "steps"),
    ("txt2img", {"steps": 2.5}, 422, "steps"),
    ("txt2img", {"steps": True}, 422, "steps"),
    ("txt2img", {"steps": MAX_STEPS + 1}, 422, "steps"),
    ("txt2img", {"steps": 0}, 422, "steps"),
    ("txt2img", b'{"cfg_scale": 1e999}', 422, "cfg_scale"),
    ("txt2img", {"cfg_scale": "high"}, 422, "cfg_scale"),
    ("txt2img", {"width": 64.5}, 422, "width"),
    ("txt2img", {"width": 62}, 422, "width"),  # not a multiple of the VAE's factor (4 here)
    ("txt2img", {"height": 4096}, 422, "height"),
    ("txt2img", {"seed": "42"}, 422, "seed"),
    ("txt2img", {"seed": -2}, 422, "seed"),
    ("txt2img", {"seed": 2**64}, 422, "seed"),
    ("txt2img", {"batch_size": MAX_IMAGES + 1}, 422, "batch_size"),
    ("txt2img", {"batch_size": 2, "n_iter": 3}, 422, "batch_size"),
    ("txt2img", {"n_iter": 0}, 422, "n_iter"),
    ("txt2img", {"sampler_name": 3}, 422, "sampler_name"),
    ("txt2img", {"override_settings": "fast"}, 422, "override_settings"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 0}}, 422,
     "override_settings.CLIP_stop_at_last_layers"),
    ("txt2img", {"clip_skip": 99}, 422, "clip_skip"),
    ("img2img", {"prompt": "x"}, 422, "init_images"),
    ("img2img", {"init_images": []}, 422, "init_images"),
    ("img2img", {"init_images": png_b64((8, 8))}, 422, "init_images"),
    ("img2img", {"init_images": [5]}, 422, "init_images"),
    ("img2img", {"init_images": ["***not base64***"]}, 422, "init_images"),
    ("img2img", {"init_images": [NOT_AN_IMAGE]}, 422, "init_images"),
    ("img2img", {"init_images": [png_b64((1000, 20))]}, 422, "init_images"),
    ("img2img", {"init_images": [png_b64((200, 20))]}, 422, "init_images"),  # over --max-size, not resized
    ("img2img", {"init_images": [png_b64((64, 64))], "denoising_strength": 0}, 422, "denoising_strength"),
    ("img2img", {"init_images": [png_b64((64, 64))], "denoising_strength": 1.5}, 422, "denoising_strength"),
    ("img2img", {"init_images": [png_b64((64, 64))], "denoising_strength": "0.5"}, 422, "denoising_strength"),
    ("img2img", {"init_images": [png_b64((64, 64))], "steps": 4, "denoising_strength": 0.1}, 422,
     "denoising_strength"),  # no step would run
]


@pytest.mark.parametrize("path, payload, status, field", BAD_REQUESTS)
def test_bad_request_names_the_field(server, path, payload, status, field):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    answer_status, answer = post_raw(server, f"/sdapi/v1/{path}", data)
    assert (answer_status, answer["field"]) == (status, field), answer
    assert answer["error"] == "RequestError" and answer["detail"].startswith(f"{field}: ")
    assert "Traceback" not in answer["detail"] and "\n" not in answer["detail"]


def test_still_serving_after_bad_requests(server):
    for path, payload, _, _ in BAD_REQUESTS[:6]:
        post_raw(server, f"/sdapi/v1/{path}", payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    assert generated(server, txt2img(steps=2))[1]["all_seeds"] == [11]
    assert "Traceback" not in server.log_text()


def test_unexpected_errors_are_one_line_of_json(caplog):
    """In process (no error can be provoked over HTTP on purpose): the route class that every
    endpoint uses answers an unexpected exception with 500 and one line, and logs the traceback;
    a Pipeline's InputError becomes the API field it names."""
    from fastapi import APIRouter, FastAPI
    from fastapi.testclient import TestClient

    from minisd.errors import InputError
    from minisd.server.a1111 import as_request_error, json_errors_route

    router = APIRouter(route_class=json_errors_route())

    @router.get("/boom")
    def boom():
        raise RuntimeError("secret internals\nline two")

    app = FastAPI()
    app.include_router(router)
    with caplog.at_level("ERROR", logger="minisd"):
        answer = TestClient(app).get("/boom")
    assert answer.status_code == 500
    assert answer.json() == {"error": "InternalError", "field": None,
                             "detail": "internal error (RuntimeError); the server's log has the details"}
    assert "secret internals" in caplog.text and "Traceback" in caplog.text
    for message, expected in (("strength: must be in (0, 1]", "denoising_strength: must be in (0, 1]"),
                              ("image: 2 images for 1 prompt", "init_images: 2 images for 1 prompt"),
                              ("height: too big", "height: too big"),
                              ("no field named here: why", "body: no field named here: why")):
        error = as_request_error(InputError(message))
        assert (error.field, str(error)) == (expected.partition(":")[0], expected)


def test_a_body_larger_than_any_valid_request_is_refused_unread(server):
    """413 from the Content-Length alone: the server never reads (or waits for) the body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999999\r\nConnection: close\r\n\r\n{")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(body)["field"] == "body"
    assert server.get("/sdapi/v1/options")[0] == 200  # and it keeps serving
