"""tools/bench.py's mode grammar and grouping (fast), its report's int8 numbers, and one smoke run
of the OpenVINO peer on the tiny model (skipped without openvino and nncf)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import bench  # tools/ is on sys.path (setup.cfg's [tool:pytest] pythonpath)
import bench_report
from bench import Mode, default_modes, group_modes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, lib, dtype, compiled", [
    ("diffusers-fp32", "diffusers", "fp32", False),
    ("minisd-bf16-compiled", "minisd", "bf16", True),
    ("openvino-bf16", "openvino", "bf16", False),
    ("openvino-int8", "openvino", "int8", False),
    ("minisd-int8", "minisd", "int8", True),  # int8 always compiles; the name has no suffix
    ("baseline-int8", "baseline", "int8", True),
])
def test_modes_parse_and_name_themselves(name, lib, dtype, compiled):
    mode = Mode.parse(name)
    assert (mode.lib, mode.dtype, mode.compiled) == (lib, dtype, compiled)
    assert mode.name == name


@pytest.mark.parametrize("name", ["openvino-fp32", "openvino-bf16-compiled", "minisd-int8-compiled",
                                  "diffusers-int8", "onnx-bf16", "minisd-int4"])
def test_modes_that_do_not_exist_are_refused(name):
    with pytest.raises(ValueError, match="bad mode"):
        Mode.parse(name)


def test_int8_modes_alternate_with_bf16_and_come_last_in_the_table():
    modes = [Mode.parse(n) for n in ("openvino-int8", "minisd-int8", "diffusers-fp32", "openvino-bf16",
                                     "diffusers-bf16", "minisd-bf16", "minisd-fp32")]
    groups = group_modes(modes, "dtype")
    assert [[m.name for m in g] for g in groups] == [
        ["diffusers-fp32", "minisd-fp32"],
        ["diffusers-bf16", "minisd-bf16", "openvino-bf16", "openvino-int8", "minisd-int8"]]
    rows = sorted(({"lib": m.lib, "dtype": m.dtype, "compiled": m.compiled} for m in modes),
                  key=bench_report.table_key)
    assert [(r["lib"], r["dtype"]) for r in rows][-2:] == [("openvino", "int8"), ("minisd", "int8")]


def test_openvino_is_opt_in_and_cpu_only(capsys):
    assert not any(m.lib == "openvino" for m in default_modes("cpu", False, False))
    assert {"openvino-bf16", "openvino-int8"} <= {m.name for m in default_modes("cpu", False, False, True)}
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--modes", "openvino-bf16"])
    assert "CPU only" in capsys.readouterr().err


def test_a_missing_openvino_names_the_install_command(monkeypatch):
    import bench_openvino

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(RuntimeError, match="pip install -c requirements-pins.txt openvino nncf"):
        bench_openvino.import_openvino(int8=False)


def test_minisd_int8_refuses_a_minisd_without_quantize():
    from types import SimpleNamespace

    import torch
    from bench_worker import Session, WorkerError

    class OldPipeline:  # from_pretrained as minisd had it before quantize=
        @classmethod
        def from_pretrained(cls, pretrained, device="cpu", dtype=None, compile=False, **components):
            raise AssertionError("must not load")

    worker = SimpleNamespace(spec={"dtype": "int8", "compiled": True, "minisd_compile": True}, notes=[],
                             device=torch.device("cpu"))
    with pytest.raises(WorkerError, match="no quantize="):
        Session._load_minisd(worker, OldPipeline, Path("unused"), torch.bfloat16)


@pytest.mark.parametrize("in_process", [False, True])
def test_minisd_in_process_compiles_without_the_package_cache(in_process, capsys):
    """--minisd-in-process reaches from_pretrained as compile_cache=False, and only then."""
    from types import SimpleNamespace

    import torch
    from bench import Mode, main, worker_spec
    from bench_worker import Session

    calls = []

    class Recording:  # from_pretrained's signature as minisd has it: records the keywords
        @classmethod
        def from_pretrained(cls, pretrained, device="cpu", dtype=None, compile=False, *, quantize=None,
                            compile_cache=None, **components):
            calls.append({"compile": compile, "quantize": quantize, "compile_cache": compile_cache})
            return cls()

    with pytest.raises(SystemExit):  # the flag is bench's own
        main(["--help"])
    assert "--minisd-in-process" in capsys.readouterr().out
    args = SimpleNamespace(baseline=None, device="cpu", size=64, steps=2, minisd_compile=True,
                           minisd_in_process=in_process, diffusers_compile_mode="default", warm_compile_cache=True)
    spec = worker_spec(Mode.parse("minisd-int8"), args, Path("unused"))
    worker = SimpleNamespace(spec=spec, notes=[], device=torch.device("cpu"))
    Session._load_minisd(worker, Recording, Path("unused"), torch.bfloat16)
    assert calls == [{"compile": True, "quantize": "int8", "compile_cache": False if in_process else None}]
    assert ("compile_cache=False" in "; ".join(worker.notes)) == in_process


def _result(lib, dtype, unet_s, image):
    return {"lib": lib, "dtype": dtype, "compiled": False, "e2e_s_all": [1.0], "unet_s_all": [unet_s],
            "vae_s_all": [0.1], "image": image}


def test_int8_modes_are_measured_against_both_peaks_and_minisd_int8_is_judged():
    np = pytest.importorskip("numpy")
    ref = np.zeros((4, 4, 3))
    results = {"diffusers-fp32": _result("diffusers", "fp32", 1.0, ref),
               "minisd-int8": _result("minisd", "int8", 0.5, ref + 0.1),  # 20 dB: fails the 30 dB bar
               "openvino-int8": _result("openvino", "int8", 0.5, ref + 0.1)}  # shown, not judged
    flops = {"unet_step": 100e9, "vae_decode": 10e9}
    summary = bench_report.summarize(results, flops, {"fp32": 100.0, "bf16": 400.0, "int8": 800.0}, steps=10)
    r = results["openvino-int8"]
    assert r["unet_gflops"] == pytest.approx(200) and r["unet_pct_peak"] == pytest.approx(25)
    assert r["unet_pct_peak_bf16"] == pytest.approx(50) and r["pct_peak_of"] == "int8"
    assert [c["check"] for c in summary["parity"]] == ["minisd-int8 vs diffusers-fp32"]
    assert not summary["parity"][0]["ok"] and summary["parity"][0]["psnr_db"] == pytest.approx(20)
    # No int8 peak (torch._int_mm missing): against bf16, and the table says so.
    bench_report.summarize(results, flops, {"fp32": 100.0, "bf16": 400.0}, steps=10)
    assert results["openvino-int8"]["pct_peak_of"] == "bf16"
    assert results["openvino-int8"]["unet_pct_peak"] == pytest.approx(50)


def test_openvino_smoke_run_on_the_tiny_model(tmp_path):
    pytest.importorskip("openvino", reason="the openvino modes need openvino (pip install -c "
                        "requirements-pins.txt openvino nncf)")
    pytest.importorskip("nncf", reason="openvino-int8 needs nncf (pip install -c requirements-pins.txt nncf)")
    out = tmp_path / "bench.json"
    # Kept short (process starts, tracing, nncf and the matmul peaks dominate, about a minute on
    # a quiet 2-core CPU): openvino-int8 runs all of openvino-bf16's path (conversion, both
    # stand-ins, the bf16 compile) plus the calibration; diffusers-fp32 is the PSNR reference;
    # one group (--group-by none), so the peaks are measured twice, not three times.
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--tiny", "--size", "64", "--steps", "2",
           "--repeats", "1", "--group-by", "none", "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
           "--modes", "diffusers-fp32,openvino-int8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())["modes"]["openvino-int8"]
    assert "error" not in r and r["unet_s"] > 0 and r["vae_s"] > 0  # CallTimer timed the stand-ins
    assert math.isfinite(float(r["psnr_vs_diffusers-fp32"]))
    assert all(word in r["note"] for word in ("convert", "calibrate", "compile"))
    assert r["unet_pct_peak_bf16"] > 0
    assert "openvino-int8" in proc.stdout  # in the table
