"""tools/bench.py's numbers: medians, ratios, GFLOP/s, PSNR, the parity verdicts, the table.

`results` maps each mode's name to what its worker measured (lists `*_all` over the
repetitions, the first image's numbers, the image itself) and what the mode is (`lib`,
`dtype`, `compiled`); `summarize` adds the derived numbers to it.

- Ratios: each mode's seconds per image over diffusers fp32 eager's and over the fastest
  diffusers mode's (below 1: faster); a minisd mode's also over its baseline twin's (`minisd-X`
  over `baseline-X`) when bench runs with --baseline. Read ratios, not seconds, on a shared
  machine.
- Parity: PSNR (dB, images in [0, 1]) of each mode's image against diffusers fp32 and minisd
  fp32. minisd fp32 must reach FP32_MIN_PSNR_DB against diffusers fp32, or diffusers' own
  half-precision PSNR if that is lower (CUDA's default TF32 convolutions make "fp32" about
  fp16-precise); a minisd half-precision mode must come within HALF_MARGIN_DB of diffusers'
  image in that dtype (both against diffusers fp32); minisd-int8 must reach INT8_MIN_PSNR_DB
  against diffusers fp32 (there is no diffusers int8 to compare with). Baseline and openvino
  modes are shown, not judged.
- GFLOP/s and %peak: the UNet step's FLOPs (the float model's count, int8 operations counted
  alike) over its median time, against the matrix-product peak of the mode's dtype; int8 modes
  also against the bf16 peak (their other ops run in bf16), and against bf16 alone when no
  int8 peak could be measured (`pct_peak_of` says which).
"""
from __future__ import annotations

import math
import statistics

from bench_model import GUIDANCE

FP32_MIN_PSNR_DB = 40.0  # minisd fp32 vs diffusers fp32, same seed, whole pipeline (or less: parity_checks)
HALF_MARGIN_DB = 3.0  # minisd half vs diffusers fp32 may be this much below diffusers half's PSNR
INT8_MIN_PSNR_DB = 30.0  # minisd int8 (UNet int8, rest bf16) vs diffusers fp32
LIBS = ("diffusers", "baseline", "minisd", "openvino")  # the table's order within a dtype


def psnr(a, b) -> float:
    """dB between two images in [0, 1]; inf when identical, nan when either is not finite."""
    mse = float(((a.astype("float64") - b.astype("float64")) ** 2).mean())
    if not math.isfinite(mse):
        return math.nan
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def summarize(results: dict, flops: dict, peaks: dict, steps: int) -> dict:
    """Medians and derived numbers into each mode's results; returns the run's summary."""
    for name, r in results.items():
        for key in ("e2e_s", "unet_s", "vae_s"):
            if r.get(key + "_all"):
                r[key] = statistics.median(r[key + "_all"])
        if "load_s" in r and "first_image_s" in r:
            # What a one-off run waits for: a loader that defers reading the weights (diffusers
            # maps the file) pays for it in the first image instead.
            r["to_first_image_s"] = r["load_s"] + r["first_image_s"]
        if "e2e_s" in r:
            if r["compiled"]:
                r["compile_s"] = r["first_image_s"] - r["e2e_s"]
            r["unet_gflops"] = flops["unet_step"] / r["unet_s"] / 1e9
            # An int8 mode with no int8 peak (torch._int_mm missing) is measured against bf16.
            r["pct_peak_of"] = r["dtype"] if r["dtype"] in peaks else "bf16"
            r["unet_pct_peak"] = 100 * r["unet_gflops"] / peaks[r["pct_peak_of"]]
            if r["dtype"] == "int8":
                r["unet_pct_peak_bf16"] = 100 * r["unet_gflops"] / peaks["bf16"]
            r["vae_gflops"] = flops["vae_decode"] / r["vae_s"] / 1e9
            r["e2e_gflops"] = (steps * flops["unet_step"] + flops["vae_decode"]) / r["e2e_s"] / 1e9

    def e2e(name):
        return results.get(name, {}).get("e2e_s")

    base = e2e("diffusers-fp32")
    diffusers_times = {n: r["e2e_s"] for n, r in results.items() if r["lib"] == "diffusers" and "e2e_s" in r}
    best = min(diffusers_times, key=diffusers_times.get) if diffusers_times else None
    for name, r in results.items():
        if "e2e_s" in r:
            r["ratio_vs_diffusers_fp32"] = r["e2e_s"] / base if base else None
            r["ratio_vs_diffusers_best"] = r["e2e_s"] / diffusers_times[best] if best else None
            twin = e2e(name.replace("minisd-", "baseline-", 1)) if r["lib"] == "minisd" else None
            if twin:
                r["ratio_vs_baseline"] = r["e2e_s"] / twin
        for ref in ("diffusers-fp32", "minisd-fp32"):
            if "image" in r and "image" in results.get(ref, {}):
                r[f"psnr_vs_{ref}"] = psnr(r["image"], results[ref]["image"])
    return {"diffusers_best": best, "parity": parity_checks(results)}


def parity_checks(results: dict) -> list[dict]:
    """minisd's images against diffusers' (thresholds in the module docstring)."""
    def p(name, ref="diffusers-fp32"):
        return results.get(name, {}).get(f"psnr_vs_{ref}")

    checks = []
    if p("minisd-fp32") is not None:
        # On CUDA, "fp32" convolutions run in TF32 (PyTorch's default), about as precise as
        # fp16: there the bar is diffusers' own half-precision distance, if that is lower.
        half_refs = [v for v in (p("diffusers-bf16"), p("diffusers-fp16")) if v is not None]
        need = min(FP32_MIN_PSNR_DB, max(half_refs, default=math.inf))
        checks.append({"check": "minisd-fp32 vs diffusers-fp32", "psnr_db": p("minisd-fp32"),
                       "need_db": need, "ok": p("minisd-fp32") >= need})
    for half in ("bf16", "fp16"):
        ours, theirs = p(f"minisd-{half}"), p(f"diffusers-{half}")
        if ours is not None and theirs is not None:
            need = theirs - HALF_MARGIN_DB
            checks.append({"check": f"minisd-{half} vs diffusers-fp32", "psnr_db": ours,
                           "need_db": need, "reference": f"diffusers-{half} vs diffusers-fp32: {theirs:.1f} dB",
                           "ok": ours >= need or (math.isinf(ours) and math.isinf(theirs))})
    for int8 in ("minisd-int8",):
        if p(int8) is not None:
            checks.append({"check": f"{int8} vs diffusers-fp32", "psnr_db": p(int8),
                           "need_db": INT8_MIN_PSNR_DB, "ok": p(int8) >= INT8_MIN_PSNR_DB})
    return checks


def fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, nan
    return format(value * scale, spec)


def table_key(r: dict):
    """By dtype (fp32 first, int8 after the half-precision modes), then eager before compiled,
    then LIBS' order."""
    return r["dtype"] != "fp32", r["dtype"] == "int8", r["compiled"], LIBS.index(r["lib"])


def print_table(results: dict, summary: dict, meta: dict) -> None:
    cuda = meta["device"] == "cuda"
    mem_label = "GPU peak" if cuda else "peak RSS"
    cols = [("mode", "<24"), ("s/image", ">8"), ("/d-fp32", ">7"), ("/d-best", ">7"), ("UNet ms", ">8"),
            ("GFLOP/s", ">8"), ("%peak", ">6"), ("VAE ms", ">8"), ("load s", ">7"), ("1st img s", ">9"),
            ("compile s", ">9"),
            (mem_label + " GB", ">11"), ("PSNR d32", ">8"), ("PSNR m32", ">8")]
    int8_rows = any(r["dtype"] == "int8" for r in results.values())
    if int8_rows:  # int8 modes' % of the bf16 peak, beside their % of the int8 peak
        cols.insert(7, ("%bf16pk", ">7"))
    done = sorted({len(r.get("e2e_s_all", [])) for r in results.values()} - {0}) or [0]
    runs = str(done[0]) if len(done) == 1 else f"{done[0]}-{done[-1]}"
    print(f"\n{meta['size']}x{meta['size']}, {meta['steps']} steps, CFG {GUIDANCE}, {meta['device']} "
          f"({meta['device_name']}), medians of {runs} repetition(s); torch {meta['torch']}, "
          f"diffusers {meta['diffusers']}")
    print(f"FLOPs: CFG UNet step {meta['flops']['unet_step'] / 1e9:.1f} G, VAE decode "
          f"{meta['flops']['vae_decode'] / 1e9:.1f} G; matmul peak "
          + ", ".join(f"{k} {v:.0f} " + ("GOP/s (torch._int_mm)" if k == "int8" else "GFLOP/s")
                      for k, v in meta["matmul_peak_gflops"].items()))
    print("  ".join(format(name, spec) for name, spec in cols))
    for name, r in sorted(results.items(), key=lambda item: table_key(item[1])):
        row = [name, fmt(r.get("e2e_s"), ".2f"), fmt(r.get("ratio_vs_diffusers_fp32"), ".2f"),
               fmt(r.get("ratio_vs_diffusers_best"), ".2f"), fmt(r.get("unet_s"), ".0f", 1e3),
               fmt(r.get("unet_gflops"), ".0f"), fmt(r.get("unet_pct_peak"), ".0f"),
               *([fmt(r.get("unet_pct_peak_bf16"), ".0f")] if int8_rows else []),
               fmt(r.get("vae_s"), ".0f", 1e3), fmt(r.get("load_s"), ".1f"),
               fmt(r.get("to_first_image_s"), ".1f"), fmt(r.get("compile_s"), ".1f"),
               fmt(r.get("peak_mem", r.get("peak_mem_first")), ".2f", 1 / 2 ** 30),
               fmt(r.get("psnr_vs_diffusers-fp32"), ".1f"), fmt(r.get("psnr_vs_minisd-fp32"), ".1f")]
        if "error" in r:
            row[1] = "ERROR" if "e2e_s" not in r else row[1]
        print("  ".join(format(v, spec) for v, (_, spec) in zip(row, cols)))
    print(f"/d-fp32, /d-best: s/image over diffusers-fp32's and over the fastest diffusers mode's "
          f"({summary['diffusers_best'] or '-'}). GFLOP/s, %peak: the UNet step (the float model's "
          f"FLOPs) against the mode's dtype matmul peak"
          + (", int8 modes' against the int8 peak and (%bf16pk) the bf16 one" if int8_rows else "")
          + ". 1st img: load + first image (compile included; openvino's convert, calibrate and "
          f"compile are in load). PSNR dB vs diffusers-fp32 (d32) and minisd-fp32 (m32).")
    if any(r.get("pct_peak_of") == "bf16" and r["dtype"] == "int8" for r in results.values()):
        print("No int8 matmul peak could be measured here (torch._int_mm): int8 modes' %peak is "
              "against the bf16 peak.")
    if meta.get("baseline"):
        ratios = [f"{name} {r['ratio_vs_baseline']:.2f}" for name, r in results.items() if "ratio_vs_baseline" in r]
        print(f"baseline: minisd of {meta['baseline']}. minisd-X s/image over baseline-X's (below 1: "
              f"faster): {', '.join(ratios) or '-'}")
    for name, r in results.items():
        if r.get("note"):
            print(f"  {name}: {r['note']}")
        if "error" in r:
            print(f"  {name}: {r['error'].splitlines()[-1]}")
    for c in summary["parity"]:
        extra = f" ({c['reference']})" if "reference" in c else ""
        print(f"parity {'PASS' if c['ok'] else 'FAIL'}: {c['check']} {fmt(c['psnr_db'], '.1f')} dB, "
              f"need >= {c['need_db']:.1f}{extra}")
