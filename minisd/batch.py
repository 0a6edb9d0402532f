"""`minisd batch`: one image per prompt of a file, resumable, scaled out on torchrun.

    minisd batch prompts.txt --out DIR -s 100 --steps 25                   one process
    torchrun --nproc-per-node 4 -m minisd batch prompts.txt --out DIR ...  four workers

    DIR/run.json             what this run is: the prompt file's hash, the options, the seed
    DIR/00007-a-red-cube.png prompt 7's image, seed + 7 unless its line sets one, written atomically
    DIR/.shards/rank-R.jsonl one line per image a worker finished, appended as it goes
    DIR/manifest.jsonl       all of them, one line per image in prompt order, merged by rank 0

A prompt is done when its image exists and a shard or the manifest lists it. A rerun of the
same command (after a crash, a Ctrl-C or a SIGKILL) merges what was listed, drops stale
temporary files and generates the rest; an image depends only on its own line, never on how
many workers ran or in which order. Under torchrun, workers take the next prompt from a
counter in torch.distributed's store (the one torchrun already runs), so faster workers take
more; with `--max-restarts`, a worker's death restarts the group, which resumes the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InputError
from .files import read_image, save_png_atomically
from .img2img import DEFAULT_STRENGTH, check_strength
from .pnginfo import generation_parameters
from .runtime import MAX_SEED, ProgressBar
from .step_skipping import check_step_skipping_options, step_skipping

# What a .jsonl line may set, and the type each must have.
LINE_FIELDS = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": (int, float),
               "width": int, "height": int, "init_image": str, "strength": (int, float)}


@dataclass
class Item:
    """One prompt of the file and everything its image depends on."""
    index: int  # 0-based, counting prompts only
    line: int  # 1-based line of the file, for messages
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int | None
    height: int | None
    init_image: str | None
    strength: float | None

    @property
    def file(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:48].rstrip("-")
        return f"{self.index:05d}-{slug or 'prompt'}.png"


def read_prompts(path: Path) -> list[tuple[int, dict]]:
    """(line number, fields) of each prompt: a text file (one prompt a line; blank lines and
    lines starting with # skipped) or a .jsonl file of objects with a "prompt"."""
    if path.is_dir() or not path.exists():
        raise InputError(f"PROMPTS: {str(path)!r} {'is a folder' if path.is_dir() else 'does not exist'}; "
                         "name a text or .jsonl file of prompts")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a leading BOM is not text
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: not UTF-8 text") from None
    prompts = []
    for number, text in enumerate(lines, 1):
        if not text.strip() or (path.suffix != ".jsonl" and text.lstrip().startswith("#")):
            continue
        prompts.append((number, _json_line(path, number, text) if path.suffix == ".jsonl" else {"prompt": text.strip()}))
    if not prompts:
        raise InputError(f"{path}: no prompts in it (blank lines and # comments are skipped)")
    return prompts


def _json_line(path: Path, number: int, text: str) -> dict:
    where = f"{path} line {number}"
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("prompt"), str):
        raise InputError(f'{where}: expected an object with a "prompt" string, such as {{"prompt": "a red cube"}}')
    for key, value in fields.items():
        if key not in LINE_FIELDS:
            raise InputError(f"{where}: unknown field {key!r}; a line may set {', '.join(LINE_FIELDS)}")
        if isinstance(value, bool) or not isinstance(value, LINE_FIELDS[key]):
            raise InputError(f"{where}: {key} must be {_kind(LINE_FIELDS[key])}, got {json.dumps(value)[:40]}")
    return fields


def _kind(types) -> str:
    return {str: "a string", int: "an integer"}.get(types, "a number")


def make_items(prompts: list[tuple[int, dict]], args, seed: int, path: Path) -> list[Item]:
    """Each prompt with the command line's options, overridden by its line's fields (an
    init_image of a line is read relative to the prompt file's folder)."""
    base = path.parent
    width, height = args.size or (args.width, args.height)
    items = []
    for index, (line, fields) in enumerate(prompts):
        init = fields.get("init_image")
        init = str((base / init) if init else args.init_image) if (init or args.init_image) else None
        item = Item(index, line, fields["prompt"], fields.get("negative_prompt", args.negative),
                    fields.get("seed", seed + index), fields.get("steps", args.steps),
                    float(fields.get("guidance", args.guidance)), fields.get("width", width),
                    fields.get("height", height), init, fields.get("strength", args.strength if init else None))
        if not 0 <= item.seed <= MAX_SEED:
            raise InputError(f"{path} line {line}: seed must lie in [0, {MAX_SEED}], got {item.seed}")
        if "strength" in fields and item.init_image is None:  # --strength serves the lines with an image
            raise InputError(f"{path} line {line}: strength applies to img2img only; give init_image too")
        items.append(item)
    return items


class Folder:
    """DIR: the run's record, the images, the shards and the manifest."""

    def __init__(self, root: Path):
        self.root, self.shards = root, root / ".shards"

    def claim(self, run: dict, seed_given: bool) -> dict:
        """Start or resume the run in DIR: refuse a folder holding something else, or a run of
        other prompts or options. Returns the run record (its seed is the one to use)."""
        record = self.root / "run.json"
        if self.root.is_file():
            raise InputError(f"--out: {str(self.root)!r} is a file; name a folder")
        if record.is_file():
            try:
                old = json.loads(record.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if not isinstance(old, dict):
                raise InputError(f"--out: {record} is damaged; choose a new --out folder (the images in "
                                 f"{self.root} are kept)")
            if not seed_given:
                run = {**run, "seed": old.get("seed")}
            changed = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
            if changed:
                what = ", ".join(f"{k}: {old.get(k)!r} then, {run.get(k)!r} now" for k in changed)[:400]
                raise InputError(f"--out: {self.root} holds a run of other prompts or options ({what}); "
                                 "rerun it as it was, or choose a new --out folder")
            return old
        if self.root.is_dir() and any(self.root.iterdir()):
            raise InputError(f"--out: {self.root} exists and is not a minisd batch folder (no run.json); "
                             "choose a new or empty folder")
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomically(record, json.dumps(run, indent=1) + "\n")
        return run

    def tidy(self) -> None:
        """Drop what a killed run left half-done: temporary files of unfinished writes."""
        for stale in [*self.root.glob(".*.tmp"), *self.root.glob("*/.*.tmp")]:
            stale.unlink(missing_ok=True)

    def listed(self) -> dict[int, dict]:
        """index -> manifest line, from the manifest and every shard, of images that exist."""
        lines: dict[int, dict] = {}
        for source in [self.root / "manifest.jsonl", *sorted(self.shards.glob("rank-*.jsonl"))]:
            if source.is_file():
                for text in source.read_text().splitlines():
                    try:  # a line cut by a kill is not a record: its image is made again
                        entry = json.loads(text)
                    except json.JSONDecodeError:
                        continue
                    if (self.root / entry["file"]).is_file():
                        lines.setdefault(entry["index"], entry)
        return lines

    def merge(self) -> int:
        """One manifest, one line per listed image, in prompt order; then the shards go."""
        lines = self.listed()
        write_atomically(self.root / "manifest.jsonl", "".join(json.dumps(lines[i]) + "\n" for i in sorted(lines)))
        for shard in self.shards.glob("rank-*.jsonl"):
            shard.unlink()
        if self.shards.is_dir() and not any(self.shards.iterdir()):
            self.shards.rmdir()
        return len(lines)

    def append(self, rank: int, entry: dict) -> None:
        self.shards.mkdir(exist_ok=True)
        with open(self.shards / f"rank-{rank}.jsonl", "a", encoding="utf-8") as shard:
            shard.write(json.dumps(entry) + "\n")
            shard.flush()
            os.fsync(shard.fileno())


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Workers:
    """This process's share of the work: alone, or one of torchrun's workers, which hand out
    prompts through the store torchrun already runs (no extra service)."""

    def __init__(self):
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.store, self._counts = None, {}
        if self.world > 1:
            from datetime import timedelta

            import torch.distributed as dist

            # The store alone, no process group: after a --max-restarts restart, a gloo or NCCL
            # group's setup can read the last attempt's addresses from torchrun's store, which
            # outlives it, and fail or hang (pytorch/pytorch#135712). torchrun's agent hosts the
            # store (TORCHELASTIC_USE_AGENT_STORE); else rank 0 does, as init_process_group would.
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world,
                                       is_master=not agent_store and self.rank == 0, timeout=timedelta(minutes=30))
            # torchrun's store outlives a restart (--max-restarts): keys of each attempt apart.
            # Rank 0's store is new each attempt, and there the count could differ between
            # machines (an agent whose own workers did not fail restarts them without counting).
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if agent_store else "0"
            self.prefix = f"minisd-batch/{attempt}/"

    def share(self, key: str, value: str | None = None) -> str:
        """Rank 0 gives `value`; every rank gets it (waiting for rank 0)."""
        if self.store is None:
            return value
        if self.rank == 0:
            self.store.set(self.prefix + key, value)
            return value
        return self.store.get(self.prefix + key).decode()

    def add(self, key: str, amount: int = 1) -> int:
        """A counter shared by all workers: its value after adding."""
        if self.store is None:
            self._counts[key] = self._counts.get(key, 0) + amount
            return self._counts[key]
        return self.store.add(self.prefix + key, amount)

    def close(self) -> None:
        self.store = None  # a client disconnects; rank 0's own store (if it hosts one) stops


def run_batch(args, load_pipeline) -> int:
    """The `minisd batch` command: see the module docstring."""
    prompts = read_prompts(args.prompts)  # every rank: a bad file fails everywhere, naming the line
    for name, value in (("--steps", args.steps), ("--clip-skip", args.clip_skip)):
        if value < 1:
            raise InputError(f"{name}: must be at least 1, got {value}")
    if args.size and (args.width is not None or args.height is not None):
        raise InputError("--size: give the size as --size WxH or as -W/-H, not both")
    check_step_skipping_options(args)
    workers = Workers()
    try:
        if workers.world > 1 and args.device in ("auto", "cuda"):
            import torch
            if torch.cuda.is_available():
                args.device = f"cuda:{workers.local_rank}"  # one GPU per worker
        pipe = load_pipeline(args)
        plan = json.loads(workers.share("plan", _plan(args, prompts, pipe) if workers.rank == 0 else None))
        if "error" in plan:
            raise InputError(plan["error"])
        items = make_items(prompts, args, plan["seed"], args.prompts)
        folder = Folder(args.out)
        _work(pipe, args, workers, folder, [items[i] for i in plan["todo"]], plan["done"], len(items))
    finally:
        workers.close()
    return 0


def _plan(args, prompts, pipe) -> str:
    """Rank 0: claim DIR, tidy and merge what a killed run left, and list the prompts to do."""
    try:
        seed = args.seed if args.seed is not None else random.randrange(2**32)
        width, height = args.size or (args.width, args.height)
        run = {"prompts_sha256": hashlib.sha256(args.prompts.read_bytes()).hexdigest(), "model": pipe.name,
               "dtype": str(pipe.dtype).removeprefix("torch."), "negative": args.negative, "steps": args.steps,
               "guidance": args.guidance, "width": width, "height": height, "clip_skip": args.clip_skip,
               "prompt_syntax": args.prompt_syntax, "init_image": args.init_image and str(args.init_image),
               "strength": args.strength, "safety_checker": pipe.safety_checker is not None, "seed": seed}
        # Step skipping changes the images: part of the run, recorded only when used (older runs lack it).
        run.update({k: v for k, v in step_skipping(args, pipe).items() if v is not None})
        if args.fast:
            run["fast"] = True
        # Everything that can be refused is refused before the folder is claimed, so that a
        # corrected prompt file is not then refused as "another run".
        _check_items(make_items(prompts, args, seed, args.prompts), pipe, args)
        folder = Folder(args.out)
        seed = folder.claim(run, seed_given=args.seed is not None)["seed"]
        items = make_items(prompts, args, seed, args.prompts)
        folder.tidy()
        done = folder.merge()
        listed = folder.listed()
        todo = [item.index for item in items if item.index not in listed]
        return json.dumps({"seed": seed, "todo": todo, "done": done})
    except InputError as e:  # every worker stops with the same message
        return json.dumps({"error": str(e)})


def _check_items(items: list[Item], pipe, args) -> None:
    """What would fail halfway fails now, naming the option or the file and line: sizes,
    steps, strengths, init images."""
    f, most = pipe.vae.downscale_factor, pipe.scheduler.config.num_train_timesteps
    width, height = args.size or (args.width, args.height)
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value <= 0 or value % f):
            raise InputError(f"--size/-W/-H: {name} must be a positive multiple of {f}, got {value}")
    if args.init_image is not None:
        read_image(args.init_image, "--init-image")
    checked_images = {str(args.init_image)} if args.init_image is not None else set()
    for item in items:
        where = f"{args.prompts} line {item.line}"
        for name in ("width", "height"):
            value = getattr(item, name)
            if value is not None and (value <= 0 or value % f):
                raise InputError(f"{where}: {name} must be a positive multiple of {f}, got {value}")
        if not 1 <= item.steps <= most:
            raise InputError(f"{where}: steps must lie in [1, {most}], got {item.steps}")
        if item.init_image is not None:
            try:
                check_strength(DEFAULT_STRENGTH if item.strength is None else item.strength, item.steps, most)
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
            if item.init_image not in checked_images:
                read_image(Path(item.init_image), f"{where}: init_image")
                checked_images.add(item.init_image)


def _work(pipe, args, workers: Workers, folder: Folder, todo: list[Item], done_before: int, total: int) -> None:
    """Take prompts until none is left; rank 0 then waits for the others and merges. Rank 0
    draws the one progress line for all workers (images done, images per minute, ETA)."""
    import torch

    bar = ProgressBar(total, "batch", done=done_before, enabled=workers.rank == 0 and not args.quiet,
                      min_interval=5.0, unit="image")
    start = time.perf_counter()

    def report() -> None:
        done = done_before + workers.add("done", 0)
        if done > bar.done:
            bar.update(done, **{"images/min": (done - done_before) / (time.perf_counter() - start) * 60})

    try:
        while (k := workers.add("next") - 1) < len(todo):
            item = todo[k]
            image = read_image(Path(item.init_image), "init_image") if item.init_image else None
            out = pipe(item.prompt, negative_prompt=item.negative_prompt, num_inference_steps=item.steps,
                       guidance_scale=item.guidance, height=item.height, width=item.width,
                       generator=[torch.Generator().manual_seed(item.seed)], image=image, strength=item.strength,
                       clip_skip=args.clip_skip - 1, prompt_syntax=args.prompt_syntax,
                       **step_skipping(args, pipe, item.steps))
            picture = out.images[0]
            strength = (DEFAULT_STRENGTH if item.strength is None else item.strength) if image is not None else None
            text = generation_parameters(item.prompt, item.negative_prompt, item.steps, pipe.scheduler.sampler_name,
                                         item.guidance, item.seed, picture.width, picture.height, pipe.name,
                                         denoising_strength=strength, clip_skip=args.clip_skip,
                                         **step_skipping(args, pipe, item.steps))
            save_png_atomically(picture, folder.root / item.file, text, overwrite=True)
            nsfw = bool(out.nsfw_content_detected and out.nsfw_content_detected[0])
            folder.append(workers.rank, {**asdict(item), "file": item.file, "width": picture.width,
                                         "height": picture.height, "strength": strength, "nsfw": nsfw})
            workers.add("done")
            report()
        workers.add("finished")
        while workers.rank == 0 and workers.add("finished", 0) < workers.world:  # the others' last images
            time.sleep(0.5)
            report()
    finally:
        bar.close()
    if workers.rank == 0:
        count = folder.merge()
        print(f"minisd: {count} of {total} images in {folder.root} ({len(todo)} made now), "
              f"listed in {folder.root / 'manifest.jsonl'}", file=sys.stderr)
