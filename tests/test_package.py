"""Packaging promises: the public API, and no test-only library behind `import minisd`."""
import subprocess
import sys


def test_import_minisd_never_imports_diffusers_or_transformers():
    code = ("import sys, minisd, minisd.cli, minisd.pipeline; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'huggingface_hub')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api():
    import minisd
    for name in ("Pipeline", "load_tokenizer", "load_text_encoder", "load_unet", "load_vae",
                 "load_scheduler", "load_safety_checker", "MinisdError", "__version__"):
        assert hasattr(minisd, name), name
