"""`minisd batch` on the embedded minisd-shapes model, on the CPU.

    prompt files      text and .jsonl, per-line fields; every bad file: exit 2, one line naming it
    one process       NNNNN-slug.png with its parameters chunk, manifest.jsonl; pixels = Pipeline's
    resume            a rerun makes nothing; a deleted image, a cut manifest, a stray .tmp; refusals
    torchrun (CPU)    2 workers = the bytes of one process; a SIGKILLed group finishes on rerun;
                      two "nodes" on 127.0.0.1 with a c10d rendezvous; --max-restarts after a
                      worker's SIGKILL, on one machine and on two

Single-process runs call minisd.cli.main in this process (conftest sets one thread, as torchrun
sets OMP_NUM_THREADS=1 for each worker: the same thread count gives the same bytes). torchrun
and its workers (each in a session of its own) are killed when a test ends, whichever way it ends.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minisd import Pipeline
from minisd.cli import main

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "weights" / "minisd-shapes"
OPTIONS = ["-m", str(MODEL), "--dtype", "float32", "--quiet"]
STEPS = 6  # ~0.15 s an image
SLOW_STEPS = 30  # ~0.6 s an image: a run of 16 on 2 workers lasts long enough to be killed halfway
# Max absolute difference per 8-bit channel between a batch PNG and Pipeline's image for the same
# prompt, seed and thread count (0 seen; 1 allows a rounding step).
PIXEL_LEVELS = 1
TIMEOUT = 120  # seconds, for any one torchrun
# Finding torchrun's workers (each in a session of its own) reads /proc.
needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")

PROMPTS = ["a red circle", "a blue square on white", "green triangle", "a yellow star, flat",
           "two circles", "(red:1.3) square", "a purple ring", "an orange triangle on black"]
PROMPT_FILE = "# shapes\n\n" + "\n".join(PROMPTS[:4]) + "\n# more\n   \n" + "\n".join(PROMPTS[4:]) + "\n"
SLOW_PROMPTS = "".join(f"shape number {i}, {colour}\n" for i, colour in
                       enumerate(["red", "blue", "green", "yellow"] * 4))


def batch(prompts: Path, out: Path, *options: str) -> int:
    return main(["batch", str(prompts), "--out", str(out), *OPTIONS, *options])


def pipeline_image(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    out = pipe(prompt, generator=[torch.Generator().manual_seed(seed)], prompt_syntax="a1111", **kwargs)
    return np.asarray(out.images[0], dtype=np.int16)


def assert_close(png: Path, expected: np.ndarray) -> None:
    got = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    assert got.shape == expected.shape, png.name
    assert np.abs(got - expected).max() <= PIXEL_LEVELS, png.name


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def assert_complete(out: Path, count: int) -> None:
    """Every prompt once in the manifest, every listed image there, nothing half-done left."""
    lines = manifest(out)
    assert [entry["index"] for entry in lines] == list(range(count))
    assert all((out / entry["file"]).is_file() for entry in lines)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(entry["file"] for entry in lines)
    assert not list(out.rglob("*.tmp")) and not (out / ".shards").exists()


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """PROMPTS in a text file and one process's run of it: seed 1, STEPS steps."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "p.txt").write_text(PROMPT_FILE)
    assert batch(root / "p.txt", root / "one", "-s", "1", "--steps", str(STEPS)) == 0
    return root


# --- prompt files ---------------------------------------------------------------------------

BAD_FILES = {  # id: (file name, its bytes, 1-based line named or None, what the message says)
    "missing": ("p.txt", None, None, "does not exist"),
    "folder": ("p.txt", "folder", None, "is a folder"),
    "empty": ("p.txt", b"", None, "no prompts"),
    "only-comments": ("p.txt", b"# a title\n\n  # indented\n", None, "no prompts"),
    "not-utf8": ("p.txt", b"a cat\n\xff\xfe a dog\n", 2, "not UTF-8"),
    "invalid-json": ("p.jsonl", b'{"prompt": "a"}\n\n{"prompt": "b",}\n', 3, "invalid JSON"),
    "not-an-object": ("p.jsonl", b'{"prompt": "a"}\n["b"]\n', 2, '"prompt"'),
    "no-prompt": ("p.jsonl", b'{"seed": 3}\n', 1, '"prompt"'),
    "unknown-field": ("p.jsonl", b'{"prompt": "a", "sampler": "euler"}\n', 1, "unknown field 'sampler'"),
    "wrong-type": ("p.jsonl", b'{"prompt": "a", "steps": "6"}\n', 1, "steps must be an integer"),
    "bool-seed": ("p.jsonl", b'{"prompt": "a", "seed": true}\n', 1, "seed must be an integer"),
    "width": ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b", "width": 66}\n', 2,
              "width must be a positive multiple of 4, got 66"),  # minisd-shapes' VAE factor: 4
    "strength": ("p.jsonl", b'{"prompt": "a", "init_image": "start.png", "strength": 0.1}\n', 1,
                 "leaves no step"),  # int(6 * 0.1) = 0
    "no-init-image": ("p.jsonl", b'{"prompt": "a", "init_image": "nope.png"}\n', None, "nope.png' does not exist"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_prompt_file_is_one_line_naming_file_and_line(case, tmp_path, capsys):
    name, content, line, says = BAD_FILES[case]
    path = tmp_path / name
    Image.new("RGB", (64, 64), "white").save(tmp_path / "start.png")
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert batch(path, tmp_path / "out", "-s", "1", "--steps", str(STEPS)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minisd: error: "), err
    assert name in err[0] and says in err[0], err
    if line is not None:
        assert f"line {line}:" in err[0], err


@pytest.mark.parametrize("content, line", [(b'{"prompt": "a"}\n{"prompt": "b", "seed": -1}\n', 2),
                                           (b'{"prompt": "a"}\n{"prompt": "b", "init_image": "nope.png"}\n', 2)])
def test_every_line_error_names_file_and_line(content, line, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(content)
    assert batch(tmp_path / "p.jsonl", tmp_path / "out", "-s", "1", "--steps", str(STEPS)) == 2
    err = capsys.readouterr().err
    assert f"p.jsonl line {line}:" in err, err


def test_fixed_prompt_file_runs_after_a_refusal(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "width": 66}\n')
    assert batch(tmp_path / "p.jsonl", tmp_path / "out", "-s", "1", "--steps", str(STEPS)) == 2
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "width": 68}\n')
    assert batch(tmp_path / "p.jsonl", tmp_path / "out", "-s", "1", "--steps", str(STEPS)) == 0, capsys.readouterr().err


def test_jsonl_lines_override_the_command_line(pipe, tmp_path, monkeypatch):
    """seed, steps, guidance, negative_prompt, width/height, init_image (relative to the prompt
    file's folder, not the working folder) and strength; other lines take the command line's."""
    (tmp_path / "prompts" / "in").mkdir(parents=True)
    start = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(start).ellipse((12, 12, 52, 52), fill="red")
    start.save(tmp_path / "prompts" / "in" / "start.png")
    lines = [{"prompt": "a red circle", "seed": 77, "steps": 3, "guidance": 5, "negative_prompt": "blue",
              "width": 48, "height": 32},
             {"prompt": "a blue square", "init_image": "in/start.png", "strength": 0.5},
             {"prompt": "a green triangle"}]
    (tmp_path / "prompts" / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.chdir(tmp_path)  # in/start.png is not here: it must be read beside p.jsonl
    out = tmp_path / "out"
    assert batch(tmp_path / "prompts" / "p.jsonl", out, "-s", "10", "--steps", "4", "--guidance", "6",
                 "-n", "noisy") == 0
    first, second, third = manifest(out)
    assert (first["seed"], first["steps"], first["guidance"], first["negative_prompt"],
            first["width"], first["height"]) == (77, 3, 5, "blue", 48, 32)
    assert (second["seed"], second["steps"], second["guidance"], second["negative_prompt"],
            second["strength"]) == (11, 4, 6, "noisy", 0.5)
    assert (third["seed"], third["steps"], third["init_image"], third["strength"]) == (12, 4, None, None)
    assert_close(out / first["file"], pipeline_image(pipe, "a red circle", 77, negative_prompt="blue",
                                                     num_inference_steps=3, guidance_scale=5, width=48, height=32))
    assert_close(out / second["file"], pipeline_image(pipe, "a blue square", 11, negative_prompt="noisy",
                                                      num_inference_steps=4, guidance_scale=6, image=start,
                                                      strength=0.5))
    assert_close(out / third["file"], pipeline_image(pipe, "a green triangle", 12, negative_prompt="noisy",
                                                     num_inference_steps=4, guidance_scale=6))
    assert Image.open(out / second["file"]).text["parameters"] == (
        "a blue square\nNegative prompt: noisy\nSteps: 4, Sampler: DPM++ 2M, CFG scale: 6, Seed: 11, "
        "Size: 64x64, Model: minisd-shapes, Denoising strength: 0.5")


# --- one process ----------------------------------------------------------------------------

def test_one_process_writes_pngs_and_manifest_as_the_pipeline(shapes, pipe):
    """Prompt i (counting prompts only) is NNNNN-slug.png with seed 1 + i and the parameters
    chunk, listed once in manifest.jsonl; its pixels are the Pipeline's for that prompt and seed."""
    out = shapes / "one"
    lines = manifest(out)
    assert [entry["prompt"] for entry in lines] == PROMPTS
    assert [entry["line"] for entry in lines] == [3, 4, 5, 6, 9, 10, 11, 12]  # comments and blanks skipped
    assert lines[5]["file"] == "00005-red-1-3-square.png"
    for i, entry in enumerate(lines):
        assert entry["index"] == i and entry["seed"] == 1 + i and entry["steps"] == STEPS
        assert entry["file"].startswith(f"{i:05d}-") and (entry["width"], entry["height"]) == (64, 64)
        assert Image.open(out / entry["file"]).text["parameters"] == (
            f"{PROMPTS[i]}\nSteps: {STEPS}, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: {1 + i}, "
            "Size: 64x64, Model: minisd-shapes")
        assert_close(out / entry["file"], pipeline_image(pipe, PROMPTS[i], 1 + i, num_inference_steps=STEPS))
    assert sorted(p.name for p in out.iterdir()) == sorted([*(e["file"] for e in lines), "manifest.jsonl", "run.json"])


# --- resume ---------------------------------------------------------------------------------

def copy_run(shapes: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the shapes run (its files' bytes and its prompt file)."""
    (tmp_path / "p.txt").write_text(PROMPT_FILE)
    out = tmp_path / "one"
    out.mkdir()
    for p in (shapes / "one").iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return tmp_path / "p.txt", out


def test_rerun_makes_nothing_and_remakes_only_what_is_missing(shapes, tmp_path, capsys):
    prompts, out = copy_run(shapes, tmp_path)
    before = mtimes(out)
    assert batch(prompts, out, "-s", "1", "--steps", str(STEPS)) == 0
    assert "(0 made now)" in capsys.readouterr().err
    assert {k: v for k, v in mtimes(out).items() if k != "manifest.jsonl"} == \
           {k: v for k, v in before.items() if k != "manifest.jsonl"}
    gone = manifest(out)[3]["file"]
    (out / gone).unlink()
    before = mtimes(out)
    assert batch(prompts, out, "-s", "1", "--steps", str(STEPS)) == 0
    assert "8 of 8 images" in (err := capsys.readouterr().err) and "(1 made now)" in err, err
    assert (out / gone).read_bytes() == (shapes / "one" / gone).read_bytes()
    changed = {k for k, v in mtimes(out).items() if before.get(k) != v}
    assert changed <= {gone, "manifest.jsonl"}
    assert_complete(out, len(PROMPTS))


def test_rerun_after_a_cut_manifest_line_and_a_stray_temporary_file(shapes, tmp_path, capsys):
    prompts, out = copy_run(shapes, tmp_path)
    text = (out / "manifest.jsonl").read_text()
    (out / "manifest.jsonl").write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])  # last line cut
    (out / f".{manifest(shapes / 'one')[2]['file']}.x1y2z3.tmp").write_bytes(b"\x89PNG half")
    (out / ".manifest.jsonl.tmp").write_text('{"index": 0')
    assert batch(prompts, out, "-s", "1", "--steps", str(STEPS)) == 0
    assert "(1 made now)" in capsys.readouterr().err  # the cut line's image, made again
    assert_complete(out, len(PROMPTS))
    for entry in manifest(out):
        assert (out / entry["file"]).read_bytes() == (shapes / "one" / entry["file"]).read_bytes()


@pytest.mark.parametrize("change", ["prompts", "steps", "seed", "size"])
def test_rerun_with_other_prompts_or_options_is_refused(change, shapes, tmp_path, capsys):
    prompts, out = copy_run(shapes, tmp_path)
    options = ["-s", "1", "--steps", str(STEPS)]
    if change == "prompts":
        prompts.write_text(PROMPT_FILE + "one more\n")
    else:
        options = {"steps": ["-s", "1", "--steps", str(STEPS + 1)], "seed": ["-s", "2", "--steps", str(STEPS)],
                   "size": ["-s", "1", "--steps", str(STEPS), "--size", "64x64"]}[change]
    before = mtimes(out)
    assert batch(prompts, out, *options) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run of other prompts or options" in err[0], err
    assert {"prompts": "prompts_sha256", "steps": "steps", "seed": "seed", "size": "width"}[change] in err[0]
    assert mtimes(out) == before


def test_rerun_without_seed_resumes_with_the_recorded_seed(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:3]) + "\n")
    out = tmp_path / "out"
    assert batch(tmp_path / "p.txt", out, "--steps", str(STEPS)) == 0
    seed = json.loads((out / "run.json").read_text())["seed"]
    first = manifest(out)
    assert [entry["seed"] for entry in first] == [seed, seed + 1, seed + 2]
    made = (out / first[1]["file"]).read_bytes()
    (out / first[1]["file"]).unlink()
    capsys.readouterr()
    assert batch(tmp_path / "p.txt", out, "--steps", str(STEPS)) == 0
    assert "(1 made now)" in capsys.readouterr().err
    assert manifest(out) == first and (out / first[1]["file"]).read_bytes() == made
    assert batch(tmp_path / "p.txt", out, "--steps", str(STEPS), "-s", str(seed)) == 0  # the same, said


def test_out_folder_of_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"not ours")
    assert batch(tmp_path / "p.txt", out, "-s", "1", "--steps", str(STEPS)) == 2
    err = capsys.readouterr().err
    assert "not a minisd batch folder" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["holiday.png"]


# --- torchrun -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launcher: list[str], prompts: Path, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "minisd", "batch", str(prompts),
            "--out", str(out), "-m", str(MODEL), "--dtype", "float32", *options]


def one_machine(workers: int = 2, *more: str) -> list[str]:
    return ["--nproc-per-node", str(workers), "--master-port", str(free_port()), *more]


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, children first. torchrun starts each worker in a session of
    its own: killing torchrun's process group leaves its workers running."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(k) for k in children.read_text().split()]
        except OSError:  # the task ended meanwhile
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every worker below it at once, as a power cut or the OOM killer would."""
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def started(command: list[str], log: Path, **env: str):
    """torchrun in a session of its own; on the way out, whichever way, it and its workers are
    killed, and so is any process still naming this test's folder (a worker orphaned earlier)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MINISD_MODEL")},
           **env, "OMP_NUM_THREADS": "1"}  # torchrun's default for several workers; also for one a node
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                start_new_session=True)
    try:
        yield proc
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=30)
        marker = str(log.parent).encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if marker in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def finish(proc, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun still running after {TIMEOUT} s:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def wait_for_images(proc, out: Path, count: int, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while len(list(out.glob("[0-9]*.png"))) < count:
        assert proc.poll() is None, f"torchrun ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {count} images after {TIMEOUT} s"
        time.sleep(0.02)


@needs_proc
def test_two_workers_give_the_bytes_of_one_process(shapes, tmp_path):
    """Each worker takes prompts from the store's counter and appends to its shard; rank 0
    merges the shards into one manifest and alone draws the progress line."""
    out, log = tmp_path / "two", tmp_path / "torchrun.log"
    seen = set()
    with started(torchrun(one_machine(2), shapes / "p.txt", out, "-s", "1", "--steps", str(STEPS)), log) as proc:
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= {p.name for p in (out / ".shards").glob("rank-*.jsonl")}
            time.sleep(0.01)
        text = finish(proc, log)
    assert seen == {"rank-0.jsonl", "rank-1.jsonl"}  # both workers made images
    assert (out / "manifest.jsonl").read_bytes() == (shapes / "one" / "manifest.jsonl").read_bytes()
    for entry in manifest(out):
        assert (out / entry["file"]).read_bytes() == (shapes / "one" / entry["file"]).read_bytes(), entry["file"]
    assert_complete(out, len(PROMPTS))
    assert text.count("minisd: 8 of 8 images") == 1 and text.count("batch   8/8") == 1, text


@needs_proc
def test_killed_group_finishes_on_rerun(pipe, tmp_path):
    (tmp_path / "p.txt").write_text(SLOW_PROMPTS)
    out, log = tmp_path / "out", tmp_path / "torchrun.log"
    options = ["-s", "5", "--steps", str(SLOW_STEPS), "--quiet"]
    with started(torchrun(one_machine(2), tmp_path / "p.txt", out, *options), log) as proc:
        wait_for_images(proc, out, 3, log)
        kill_tree(proc.pid)
        proc.wait(timeout=30)
    made_before = {p.name for p in out.glob("[0-9]*.png")}
    assert 3 <= len(made_before) < 16
    with started(torchrun(one_machine(2), tmp_path / "p.txt", out, *options), log) as proc:
        text = finish(proc, log)
    # An image written but not yet listed in its worker's shard when the kill came is made again.
    made_now = int(re.search(r"\((\d+) made now\)", text)[1])
    assert 16 - len(made_before) <= made_now < 16, text
    assert_complete(out, 16)
    lines = manifest(out)
    prompts = SLOW_PROMPTS.splitlines()
    made_after = [entry for entry in lines if entry["file"] not in made_before]
    for entry in [next(e for e in lines if e["file"] in made_before), made_after[0], made_after[-1]]:
        assert entry["seed"] == 5 + entry["index"]
        assert_close(out / entry["file"], pipeline_image(pipe, prompts[entry["index"]], entry["seed"],
                                                         num_inference_steps=SLOW_STEPS))


@needs_proc
def test_two_nodes_with_a_c10d_rendezvous(shapes, tmp_path):
    endpoint, job = f"127.0.0.1:{free_port()}", f"minisd-test-{uuid.uuid4().hex[:8]}"
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                "--rdzv-id", job]
    out = tmp_path / "out"
    command = torchrun(launcher, shapes / "p.txt", out, "-s", "1", "--steps", str(STEPS), "--quiet")
    with started(command, tmp_path / "node0.log") as node0, started(command, tmp_path / "node1.log") as node1:
        finish(node0, tmp_path / "node0.log")
        finish(node1, tmp_path / "node1.log")
    assert (out / "manifest.jsonl").read_bytes() == (shapes / "one" / "manifest.jsonl").read_bytes()
    assert_complete(out, len(PROMPTS))


def kill_a_worker(agent: int) -> None:
    """SIGKILL one of torchrun's workers (not the agent), as a crash or the OOM killer would."""
    workers = [pid for pid in descendants(agent) if b"minisd" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert workers, f"no worker below torchrun {agent}"
    os.kill(workers[-1], signal.SIGKILL)


@needs_proc
def test_max_restarts_resumes_after_a_worker_is_killed(tmp_path):
    (tmp_path / "p.txt").write_text(SLOW_PROMPTS)
    out, log = tmp_path / "out", tmp_path / "torchrun.log"
    command = torchrun(one_machine(2, "--max-restarts", "1"), tmp_path / "p.txt", out, "-s", "5",
                       "--steps", str(SLOW_STEPS), "--quiet")
    with started(command, log) as proc:
        wait_for_images(proc, out, 2, log)
        kill_a_worker(proc.pid)
        assert len(list(out.glob("[0-9]*.png"))) < 16
        text = finish(proc, log)
    assert "exitcode: -9" in text, text  # the agent saw the worker die, and restarted the group
    assert_complete(out, 16)
    assert [entry["seed"] for entry in manifest(out)] == [5 + i for i in range(16)]


@needs_proc
def test_max_restarts_on_two_nodes(tmp_path):
    """A worker killed on one machine: both agents restart their workers, but only that one
    counts a restart (TORCHELASTIC_RESTART_COUNT then differs). With torchrun's store shared
    (its default) stale keys of the last attempt would be read; without it, rank 0 hosts a
    store that is new each attempt."""
    (tmp_path / "p.txt").write_text(SLOW_PROMPTS)
    endpoint, job = f"127.0.0.1:{free_port()}", f"minisd-test-{uuid.uuid4().hex[:8]}"
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                "--rdzv-id", job, "--max-restarts", "1"]
    out = tmp_path / "out"
    command = torchrun(launcher, tmp_path / "p.txt", out, "-s", "5", "--steps", str(SLOW_STEPS), "--quiet")
    logs = tmp_path / "node0.log", tmp_path / "node1.log"
    with started(command, logs[0], TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1") as node0, \
            started(command, logs[1], TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1") as node1:
        wait_for_images(node0, out, 2, logs[0])
        kill_a_worker(node1.pid)
        assert len(list(out.glob("[0-9]*.png"))) < 16
        text = finish(node0, logs[0]) + finish(node1, logs[1])
    assert "exitcode: -9" in text, text
    assert_complete(out, 16)


@pytest.mark.parametrize("name, content", [("p.txt", "\ufeffa red cube\n"), ("p.jsonl", '\ufeff{"prompt": "a red cube"}\n')])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(name, content, tmp_path):
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert batch(tmp_path / name, tmp_path / "out", "-s", "1", "--steps", str(STEPS)) == 0
    assert [entry["prompt"] for entry in manifest(tmp_path / "out")] == ["a red cube"]


def test_a_damaged_run_record_is_refused_and_the_images_kept(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red cube\n")
    assert batch(tmp_path / "p.txt", tmp_path / "out", "-s", "1", "--steps", str(STEPS)) == 0
    (tmp_path / "out" / "run.json").write_text("{not json")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert batch(tmp_path / "p.txt", tmp_path / "out", "-s", "1", "--steps", str(STEPS)) == 2
    assert "run.json is damaged" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
