"""Full-size parity report: minisd against diffusers/transformers on small-sd's real shapes.

For each component, build the diffusers/transformers model with the exact shapes of
OFA-Sys/small-stable-diffusion-v0 and seeded random weights (make_tiny_checkpoint.randomize_,
which keeps activations O(1)), write it in the legacy format of the real folder (`.bin`
pickles, old VAE attention names, `text_model.` / `vision_model.vision_model.` prefixes with
int64 `position_ids`: make_tiny_checkpoint.write_legacy), load it with minisd's own loader and
run both on the same input. The other components of that folder are tiny placeholders.

    python tools/parity.py                                # every component, temp dir removed after
    python tools/parity.py --only unet,safety --seed 3
    python tools/parity.py --workdir /tmp/parity          # keep the written folders

Metric: relative error = max|minisd - ref| / max|ref|, fp32 on the CPU; PASS at <= 1e-4.
Exit status 1 when any row fails. Times are single calls on a shared machine: read the
ratio, not the seconds. One full-size model pair at most is in memory at a time (about 5 GB
peak, for the UNet); the whole run takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import gc
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import make_tiny_checkpoint as mtc

REL_TOL = 1e-4  # max|minisd - ref| / max|ref|, fp32 CPU
UNET_PARAMS = 579_384_964  # the published small-sd UNet
SCORE_STEP = 1e-3  # the safety checker rounds its scores to 3 decimals

SHORT = {"unet": "unet", "vae": "vae", "text": "text_encoder", "safety": "safety_checker"}


def n_params(model: torch.nn.Module) -> int:
    # Weights in the checkpoint sense: the safety checker's concept embeddings are parameters
    # in diffusers and buffers in minisd; int64 position ids are not weights.
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def write_reference(component: str, folder: Path, seed: int) -> torch.nn.Module:
    """Build `component` at full size (the rest tiny), write the legacy folder, return the model."""
    parts = mtc.build_components(seed, **{component: mtc.SMALL_SD[component]})
    if component == "safety_checker":
        # Cosines of random 768-d vectors are ~N(0, 0.036); randomize_'s thresholds (~0.9)
        # would score every concept near -0.9. Thresholds near 0 make about half the
        # concepts fire, so the special-care adjustment path runs too.
        g = torch.Generator().manual_seed(seed)
        sc = parts["safety_checker"]
        for w in (sc.concept_embeds_weights, sc.special_care_embeds_weights):
            w.data.copy_(0.04 * torch.rand(w.shape, generator=g) - 0.02)
    mtc.write_legacy(parts, folder)
    return parts[component]


# --- one function pair per component: inputs -> {output name: (tensor, seconds)} ----------------

def unet_inputs(g):
    # CFG-like batch of 2 at 64x64 latents (512x512 images), a mid-schedule timestep.
    return torch.randn(2, 4, 64, 64, generator=g), torch.tensor(500), torch.randn(2, 77, 768, generator=g)


def unet_ref(model, x):
    out, s = timed(lambda: model(*x).sample)
    return {"unet": (out, s)}


def unet_minisd(model, x):
    out, s = timed(model, *x)
    return {"unet": (out, s)}


def vae_inputs(g, encode_size):
    return torch.randn(1, 4, 64, 64, generator=g), torch.rand(1, 3, encode_size, encode_size, generator=g) * 2 - 1


def vae_ref(model, x):
    z, image = x
    dec, s_dec = timed(lambda: model.decode(z).sample)
    dist, s_enc = timed(lambda: model.encode(image).latent_dist)
    return {"vae decode": (dec, s_dec), "vae encode mean": (dist.mean, s_enc),
            "vae encode logvar": (dist.logvar, s_enc)}


def vae_minisd(model, x):
    z, image = x
    dec, s_dec = timed(model.decode, z)
    (mean, logvar), s_enc = timed(model.encode, image)
    return {"vae decode": (dec, s_dec), "vae encode mean": (mean, s_enc), "vae encode logvar": (logvar, s_enc)}


def text_inputs(g):
    # A 20-token prompt and the empty negative prompt, padded with <|endoftext|> as SD does.
    bos, eos = 49406, 49407
    ids = torch.full((2, 77), eos)
    ids[:, 0] = bos
    ids[0, 1:21] = torch.randint(0, bos, (20,), generator=g)
    return ids


def text_ref(model, ids):
    out, s = timed(lambda: model(ids).last_hidden_state)
    return {"text encoder": (out, s)}


def text_minisd(model, ids):
    out, s = timed(model, ids)
    return {"text encoder": (out, s)}


def safety_inputs(g):
    return torch.randn(2, 3, 224, 224, generator=g)  # CLIP-normalised pixel values


def safety_ref(model, pixels):
    """diffusers' StableDiffusionSafetyChecker.forward, keeping its scores before rounding."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    pooled, s_pool = timed(lambda: model.vision_model(pixels)[1])
    embeds, s_proj = timed(model.visual_projection, pooled)
    special_cos = cosine_distance(embeds, model.special_care_embeds)
    concept_cos = cosine_distance(embeds, model.concept_embeds)
    scores = []
    for i in range(pixels.shape[0]):
        adjustment, special = 0.0, []
        for j in range(special_cos.shape[1]):
            special.append(special_cos[i, j].item() - model.special_care_embeds_weights[j].item() + adjustment)
            if round(special[-1], 3) > 0:
                adjustment = 0.01
        concept = concept_cos[i] - model.concept_embeds_weights + adjustment
        scores.append(torch.cat([torch.tensor(special), concept]))
    return {"safety pooled": (pooled, s_pool), "safety projection": (embeds, s_pool + s_proj),
            "safety scores": (torch.stack(scores), s_pool + s_proj)}


def safety_minisd(model, pixels):
    pooled, s_pool = timed(model.vision_model, pixels)
    embeds, s_proj = timed(model.visual_projection, pooled)
    (special, concept), s_scores = timed(model.scores, pixels)
    return {"safety pooled": (pooled, s_pool), "safety projection": (embeds, s_pool + s_proj),
            "safety scores": (torch.cat([special, concept], dim=1), s_scores)}


def check(component: str, folder: Path, seed: int, encode_size: int) -> list[tuple]:
    """Write, run the reference, free it, load and run minisd; one table row per output."""
    from minisd import load_text_encoder, load_unet, load_vae
    from minisd.safety import load_safety_checker

    g = torch.Generator().manual_seed(seed + 1)
    inputs, run_ref, load, run_mine = {
        "unet": (unet_inputs(g), unet_ref, load_unet, unet_minisd),
        "vae": (vae_inputs(g, encode_size), vae_ref, load_vae, vae_minisd),
        "text_encoder": (text_inputs(g), text_ref, load_text_encoder, text_minisd),
        "safety_checker": (safety_inputs(g), safety_ref, load_safety_checker, safety_minisd),
    }[component]

    print(f"[{component}] building and writing {folder}", file=sys.stderr, flush=True)
    ref = write_reference(component, folder, seed).eval()
    params = n_params(ref)
    if component == "unet":
        assert params == UNET_PARAMS, f"reference UNet has {params:,} parameters, small-sd has {UNET_PARAMS:,}"
    print(f"[{component}] reference ({params:,} parameters)", file=sys.stderr, flush=True)
    ref_out = run_ref(ref, inputs)
    for name, (t, _) in ref_out.items():  # a constant or exploding output would make parity meaningless
        print(f"[{component}]   {name}: shape {tuple(t.shape)}, std {t.std():.3g}, max|.| {t.abs().max():.3g}",
              file=sys.stderr, flush=True)
    del ref
    gc.collect()

    print(f"[{component}] minisd", file=sys.stderr, flush=True)
    mine = load(folder)
    for t in mine.state_dict().values():
        t.sum()  # page the memory-mapped weights in, so the timing below is of compute only
    assert n_params(mine) == params, \
        f"minisd {component} has {n_params(mine):,} parameters, the reference {params:,}"
    mine_out = run_mine(mine, inputs)
    del mine
    gc.collect()

    rows = []
    for name, (ref_t, t_ref) in ref_out.items():
        mine_t, t_mine = mine_out[name]
        assert mine_t.shape == ref_t.shape, f"{name}: minisd shape {tuple(mine_t.shape)}, ref {tuple(ref_t.shape)}"
        diff = (mine_t.float() - ref_t.float()).abs().max().item()
        scale = ref_t.abs().max().item()
        if name == "safety scores":
            # minisd's scores are rounded to 3 decimals, as diffusers' are; the reference here is
            # unrounded. Only error beyond half a rounding step counts, and the table shows
            # the difference to the reference rounded as diffusers rounds it.
            rel = max(0.0, diff - SCORE_STEP / 2) / scale
            diff = (mine_t - torch.round(ref_t / SCORE_STEP) * SCORE_STEP).abs().max().item()
        else:
            rel = diff / scale
        rows.append((name, params, diff, rel, t_mine, t_ref, "PASS" if rel <= REL_TOL else "FAIL"))
    return rows


def print_table(rows: list[tuple]) -> None:
    header = ("component", "params", "max abs diff", "rel err", "minisd s", "ref s", "result")
    lines = [header] + [(name, f"{p:,}", f"{d:.3e}", f"{r:.3e}", f"{tm:.2f}", f"{tr:.2f}", ok)
                        for name, p, d, r, tm, tr, ok in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"rel err = max|minisd - ref| / max|ref| (fp32, CPU); PASS at <= {REL_TOL:g}. "
          "safety scores: error beyond the 3-decimal rounding both sides apply.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SHORT),
                   help=f"comma-separated subset of {', '.join(SHORT)} (default: all)")
    p.add_argument("--workdir", type=Path, help="where to write the folders (kept); default a temp dir, removed after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-encode-size", type=int, default=512, help="image size for the VAE encode check")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHORT and n not in SHORT.values()]
    if unknown:
        p.error(f"--only: unknown component(s) {', '.join(unknown)}; choose from {', '.join(SHORT)}")
    components = [SHORT.get(n, n) for n in names]

    start = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="minisd-parity-"))
    rows = []
    try:
        with torch.no_grad():
            for component in components:
                folder = workdir / component
                rows += check(component, folder, args.seed, args.vae_encode_size)
                if args.workdir is None:
                    shutil.rmtree(folder)  # free the disk as we go: the UNet alone is 2.3 GB
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(rows)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(f"total {time.perf_counter() - start:.0f} s, peak RSS {peak_gib:.1f} GiB, seed {args.seed}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    return 1 if any(row[-1] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
