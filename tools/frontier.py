"""The speed/quality frontier of step skipping (T-GATE `gate_step`, DeepCache `cache_interval`),
against the plainest way to go faster: fewer steps.

    python tools/frontier.py --overwrite            # both parts; docs/frontier.json, docs/figures/frontier.png
    python tools/frontier.py --part shapes --overwrite          # the embedded model only (10-25 minutes)
    python tools/frontier.py --part small-sd --compiled --overwrite  # small-sd's shapes (30-40 minutes)

Part `shapes`: the embedded model (weights/minisd-shapes, the only trained model here).
tools/eval_shapes.py's accuracy on the same 100 prompts and seeds for every setting, against
seconds per image, for plain DPM-Solver++ at 6, 8, 10, 15, 20 and 25 steps and for each
skipping setting at 15, 20 and 25 steps. The gate sits at 40% of the steps (T-GATE's 10 of 25;
`gate60`: at 60%). Time is measured apart from accuracy, in this process (`--threads`): every
setting in turn, in rounds whose order rotates, the median per image. One ablation, not a
minisd setting, splits T-GATE's two changes: `guidance-stop` stops guidance at the gate but
keeps computing cross-attention from the text. A setting is on the Pareto front
when no other setting is both at least as fast and at least as accurate (the mean of the four
judged attributes), and better in one.

Part `small-sd` (`--compiled` adds minisd with compile=True, plain and gate+cache2, whose first
image compiles each kind of step: full, recording, shallow, gated, gated shallow): small-sd's full shapes (random weights, tools/bench_model.py), 256x256, bf16, 25
steps, one worker process per pipeline (tools/bench_worker.py), repetitions alternated: each
setting's s/image as a ratio to diffusers bf16 plain in the same run. Beside minisd's settings,
the add-on packages people bolt onto diffusers at the same settings (`DeepCache`'s
DeepCacheSDHelper, `tgate`'s TgateSDLoader and TgateSDDeepCacheLoader; tgate with its
self-attention caching off, sp_interval=fi_interval=1, warm_up=0, so that it does what
minisd's gate does), and the PSNR of minisd's image against the add-on's: the same method on
the same weights should give the same image, up to bf16 rounding.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PLAIN_STEPS = (6, 8, 10, 15, 20, 25)
SKIP_STEPS = (15, 20, 25)
# name -> (gate at this share of the steps or None, cache_interval or None, cache_branch). Branch 1
# is what enters the last up block of these layers_per_block=1 models; branch 0, the outermost,
# became minisd's default from these measurements.
SETTINGS = {"gate": (0.4, None, None), "cache2-b1": (None, 2, 1), "cache3-b1": (None, 3, 1),
            "gate+cache2-b1": (0.4, 2, 1), "gate+cache3-b1": (0.4, 3, 1), "gate60": (0.6, None, None),
            "gate60+cache2-b1": (0.6, 2, 1), "cache2-b0": (None, 2, 0), "gate+cache2-b0": (0.4, 2, 0)}


def call_kwargs(setting: str, steps: int) -> dict:
    """The Pipeline keywords of a named setting at `steps`."""
    if setting == "plain" or setting in ABLATIONS:
        return {}
    share, interval, branch = SETTINGS[setting]
    kwargs = {}
    if share is not None:
        kwargs["gate_step"] = round(share * steps)
    if interval is not None:
        kwargs.update(cache_interval=interval, cache_branch=branch)
    return kwargs


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point dominates: as fast or faster and as accurate or more, and better in one."""
    def dominates(a, b):
        return (a["s_per_image"] <= b["s_per_image"] and a["accuracy"] >= b["accuracy"]
                and (a["s_per_image"] < b["s_per_image"] or a["accuracy"] > b["accuracy"]))
    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


# --- part 1: the embedded model -------------------------------------------------------------

def shapes_part(args, previous: dict | None) -> list[dict]:
    """Accuracy of every setting on the same prompts and seeds (reused from `previous`, the last
    run's results, when its model, prompts and dtype match: the images do not change), then
    the time per image of every setting, measured afresh in alternated rounds."""
    import eval_shapes
    import shapes
    from minisd import SpeedLevers
    from minisd.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model, safety_checker=None, dtype=getattr(torch, args.dtype))
    # The ablation calls the UNet with the text's context alone after the gate, which the cached
    # cross-attention K/V lever (computed for the CFG batch's context) refuses: that lever off.
    ablation_pipe = Pipeline.from_pretrained(args.model, safety_checker=None, dtype=getattr(torch, args.dtype),
                                             levers=SpeedLevers(cached_cross_kv=False))
    cases = shapes.prompts(args.n, args.prompt_seed)
    texts, truths = [t for t, _ in cases], [t for _, t in cases]
    seeds = [10**6 + args.prompt_seed * 1000 + i for i in range(args.n)]  # eval_shapes.evaluate_model's
    runs = [("plain", s) for s in PLAIN_STEPS] + [(name, s) for name in (*SETTINGS, *ABLATIONS) for s in SKIP_STEPS]
    same_run = previous and all(previous.get(k) == v for k, v in (("model", eval_shapes.model_name(args.model)), ("n", args.n),
                                                                   ("dtype", args.dtype), ("prompt_seed", args.prompt_seed)))
    known = {(p["setting"], p["steps"]): p for p in previous["points"]} if same_run else {}

    def generate(setting, steps, count):
        with ablation(setting, steps):
            kwargs = call_kwargs(setting, steps)
            run = ablation_pipe if setting in ABLATIONS else pipe
            return eval_shapes.generate(lambda *a, **k: run(*a, **k, **kwargs), texts[:count], seeds[:count],
                                        steps, args.guidance)

    points = []
    for setting, steps in runs:
        point = known.get((setting, steps))
        if point is None:
            accuracy, _ = eval_shapes.score(generate(setting, steps, args.n), truths)
            point = {"setting": setting, "steps": steps, "kwargs": call_kwargs(setting, steps),
                     "metrics": accuracy, "accuracy": statistics.mean(accuracy[k] for k in eval_shapes.JUDGED)}
        points.append(point)
        print(f"{setting:<14} {steps:>2} steps  " + "  ".join(f"{k} {point['metrics'][k]:.0%}"
                                                              for k in (*eval_shapes.JUDGED, "size")), flush=True)
    # Time: every setting in turn, `--time-rounds` rounds of `--time-images` images, the order
    # rotated each round (this machine's speed drifts); the median per image.
    seconds = {id(p): [] for p in points}
    for r in range(args.time_rounds + 1):  # round 0 warms up
        for p in points[r % len(points):] + points[:r % len(points)]:
            start = time.perf_counter()
            generate(p["setting"], p["steps"], args.time_images)
            if r:
                seconds[id(p)].append((time.perf_counter() - start) / args.time_images)
    for p in points:
        p["s_per_image"] = statistics.median(seconds[id(p)])
    front = pareto_front(points)
    for p in points:
        p["pareto"] = p in front
        print(f"{p['setting']:<14} {p['steps']:>2} steps {p['s_per_image'] * 1e3:7.1f} ms/image  "
              f"accuracy {p['accuracy']:.1%}{'  Pareto front' if p['pareto'] else ''}", flush=True)
    return points


# Not minisd settings: what T-GATE's two changes do apart, to see which one costs what.
ABLATIONS = {"guidance-stop": 0.4}  # guidance stops at the gate, cross-attention still computed from the text


@contextlib.contextmanager
def ablation(setting: str, steps: int):
    """For an ablation setting, the pipeline's step skipping replaced by the ablation's."""
    if setting not in ABLATIONS:
        yield
        return
    import minisd.pipeline

    gate = round(ABLATIONS[setting] * steps)
    original = minisd.pipeline.step_skipping_for
    minisd.pipeline.step_skipping_for = lambda pipe, *_, **__: GuidanceStop(pipe.unet, gate)
    try:
        yield
    finally:
        minisd.pipeline.step_skipping_for = original


class GuidanceStop:
    """What the sampling loop asks step skipping (minisd/step_skipping.py's StepSkipping): past
    `gate`, guidance stops and the UNet runs on the latents alone, with the text's context,
    computing cross-attention as usual."""

    def __init__(self, unet, gate: int):
        self.unet, self.gate = unet, gate

    def gated(self, i: int) -> bool:
        return i >= self.gate

    def unet_for_step(self, i: int):
        return self.unet


# --- part 2: small-sd's shapes --------------------------------------------------------------

def small_sd_part(args) -> dict:
    from bench_model import model_folder
    from bench_report import psnr
    from bench_worker import Worker, WorkerError

    folder = model_folder(args.cache_dir, tiny=args.tiny, seed=args.seed)
    steps, gate = args.steps, round(0.4 * args.steps)
    base = {"folder": str(folder), "device": "cpu", "size": args.size, "steps": steps, "dtype": "bf16",
            "compiled": False, "minisd_from": None, "minisd_compile": None, "diffusers_compile_mode": None,
            "compile_cache": None}
    # (worker, setting): minisd runs every setting in one process, each add-on has its own (at
    # branch 1: DeepCache's cache_branch_id numbers branches 0 and 1 as minisd does for these models).
    minisd_settings = ["plain", "gate", "cache2-b1", "cache3-b1", "gate+cache2-b1", "gate+cache3-b1", "cache2-b0",
                       "gate+cache2-b0"]
    addons = {} if args.no_addons else {
        "deepcache cache2-b1": {"name": "deepcache", "cache_interval": 2, "cache_branch_id": 1},
        "tgate gate": {"name": "tgate", "call": "tgate"},
        "tgate+deepcache gate+cache2-b1": {"name": "tgate-deepcache", "call": "tgate", "cache_interval": 2,
                                           "cache_branch_id": 1},
    }
    tgate_kwargs = {"gate_step": gate, "sp_interval": 1, "fi_interval": 1, "warm_up": 0}
    workers: dict[str, Worker] = {}
    rows: dict[str, dict] = {}
    try:
        compiled = [("minisd-compiled", {"lib": "minisd", "mode": "minisd-bf16-compiled", "compiled": True,
                                         "minisd_compile": True, "time_calls": False})] if args.compiled else []
        for name, spec in [("diffusers", {"lib": "diffusers", "mode": "diffusers-bf16"}),
                           ("minisd", {"lib": "minisd", "mode": "minisd-bf16", "time_calls": False})] + compiled + [
                (name, {"lib": "diffusers", "mode": name, "addon": addon}) for name, addon in addons.items()]:
            worker = Worker({**base, **spec})
            try:
                worker.call("load")
            except WorkerError as e:
                print(f"{name}: does not load\n{e}", flush=True)
                rows[name] = {"error": str(e).splitlines()[-1]}
                worker.close()
                continue
            workers[name] = worker
        jobs = [("diffusers", "plain", {})] if "diffusers" in workers else []
        jobs += [("minisd", s, call_kwargs(s, steps)) for s in minisd_settings if "minisd" in workers]
        jobs += [("minisd-compiled", s, call_kwargs(s, steps)) for s in ("plain", "gate+cache2-b1")
                 if "minisd-compiled" in workers]
        jobs += [(name, name.split(" ", 1)[1], tgate_kwargs if "tgate" in name else {})
                 for name in addons if name in workers]
        for rep in range(args.repeats + 1):  # the first round warms up and is not counted
            order = jobs[rep % len(jobs):] + jobs[:rep % len(jobs)]
            for worker_name, setting, kwargs in order:
                time.sleep(0.2)  # let the last worker's threads go idle (as tools/bench.py does)
                key = f"{worker_name} {setting}" if worker_name in ("diffusers", "minisd", "minisd-compiled") else worker_name
                try:
                    workers[worker_name].call("use", kwargs)
                    out = workers[worker_name].call("first" if rep == 0 else "rep")
                except WorkerError as e:
                    rows.setdefault(key, {})["error"] = str(e).splitlines()[-1]
                    print(f"{key}: FAILED\n{e}", flush=True)
                    continue
                row = rows.setdefault(key, {"kwargs": kwargs, "e2e_all": []})
                if rep == 0:
                    row["image"] = out["image"]
                else:
                    row["e2e_all"].append(out["e2e_s"])
                    print(f"rep {rep}/{args.repeats} {key}: {out['e2e_s']:.2f} s/image", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    baseline = statistics.median(rows["diffusers plain"]["e2e_all"])
    for key, row in rows.items():
        if row.get("e2e_all"):
            row["s_per_image"] = statistics.median(row["e2e_all"])
            row["vs_diffusers_plain"] = row["s_per_image"] / baseline
    # The same method on the same weights: minisd's image against the add-on's.
    for addon, ours in (("deepcache cache2-b1", "minisd cache2-b1"), ("tgate gate", "minisd gate"),
                        ("tgate+deepcache gate+cache2-b1", "minisd gate+cache2-b1"), ("diffusers plain", "minisd plain")):
        if "image" in rows.get(addon, {}) and "image" in rows.get(ours, {}):
            rows[ours][f"psnr_vs_{addon.replace(' ', '_')}"] = psnr(rows[ours]["image"], rows[addon]["image"])
    for row in rows.values():
        row.pop("image", None)
    return {"size": args.size, "steps": steps, "dtype": "bf16", "gate_step": gate, "threads": torch.get_num_threads(),
            "rows": rows}


def print_small_sd(result: dict) -> None:
    print(f"\nsmall-sd shapes, {result['size']}x{result['size']}, {result['steps']} steps, bf16 "
          f"(gate_step={result['gate_step']}); medians over the repetitions")
    print(f"{'pipeline and setting':<30} {'s/image':>8} {'vs diffusers plain':>19}  PSNR vs the same setting")
    for key, row in result["rows"].items():
        if "error" in row:
            print(f"{key:<30} FAILED: {row['error']}")
            continue
        same = "  ".join(f"{k[8:]} {v:.1f} dB" for k, v in row.items() if k.startswith("psnr_vs_"))
        print(f"{key:<30} {row['s_per_image']:8.2f} {row['vs_diffusers_plain']:18.2f}x  {same}")


def main(argv=None) -> int:
    from bench_model import add_model_options

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["both", "shapes", "small-sd"], default="both")
    p.add_argument("--model", type=Path, default=ROOT / "weights" / "minisd-shapes", help="part shapes: the model")
    p.add_argument("--n", type=int, default=100, help="part shapes: prompts")
    p.add_argument("--prompt-seed", type=int, default=1234, help="part shapes: eval_shapes' prompt seed")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="part shapes")
    p.add_argument("--threads", type=int, default=1, help="part shapes: torch threads (eval_shapes' default)")
    p.add_argument("--time-rounds", type=int, default=3, help="part shapes: alternated timing rounds")
    p.add_argument("--time-images", type=int, default=10, help="part shapes: images per setting and round")
    p.add_argument("--size", type=int, default=256, help="part small-sd")
    p.add_argument("--steps", type=int, default=25, help="part small-sd")
    p.add_argument("--repeats", type=int, default=3, help="part small-sd: alternated repetitions")
    p.add_argument("--no-addons", action="store_true", help="part small-sd: leave out the add-on packages")
    p.add_argument("--compiled", action="store_true",
                   help="part small-sd: also minisd compile=True, plain and gate+cache2 (compiling takes minutes)")
    add_model_options(p)
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "frontier.json",
                   help="results (read first: a part not run keeps its last results, and part shapes reuses "
                        "the accuracies of settings it has measured)")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "figures" / "frontier.png")
    p.add_argument("--overwrite", action="store_true", help="replace the results and plot files if they exist")
    args = p.parse_args(argv)
    existing = [path for path in (args.json, args.plot) if path.exists()]
    if existing and not args.overwrite:
        p.error(f"{', '.join(map(str, existing))} exist(s): pass --overwrite to replace (the results are "
                "updated, not lost), or give --json/--plot other paths")

    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    results["command"] = "python tools/frontier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.part in ("both", "shapes"):
        import eval_shapes

        results["shapes"] = {"points": shapes_part(args, results.get("shapes")),
                             "model": eval_shapes.model_name(args.model),
                             "n": args.n, "dtype": args.dtype, "prompt_seed": args.prompt_seed, "threads": args.threads,
                             "time": f"median of {args.time_rounds} alternated rounds of {args.time_images} images"}
        from frontier_plot import plot_frontier

        plot_frontier(results["shapes"]["points"], args.plot)
        print(f"plot: {args.plot}")
    if args.part in ("both", "small-sd"):
        results["small_sd"] = small_sd_part(args)
        print_small_sd(results["small_sd"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
