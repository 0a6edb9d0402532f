"""The package cache of compiled UNets (minisd/compile_cache.py): compile=True on the CPU
compiles a model once per size, and a later process loads that instead of compiling.

Every test here builds at most one package of the tiny model (about 30 s on one core) and
shares it through `packaged`; the other process checks that it loads without compiling by
making any compile fail there."""
import json
import mmap
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minisd.aoti_package import AlignedPackage, byte_range, load_package, release_pages
from minisd.compile_cache import PackageCache, cache_folder, fingerprint, own_storages
from minisd.pipeline import Pipeline

RUN = dict(num_inference_steps=3, output_type="np", height=64, width=64)
TOL = 1e-3  # images in [0, 1]: Inductor's fused kernels reorder float32 sums (test_fast's COMPILED_TOL * 10)


def generate(pipe, prompt="a red cube", seed=0):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **RUN).images


@pytest.fixture(scope="module")
def packaged(tiny_current, tmp_path_factory):
    """(folder of the package cache, images of the process that compiled it, eager images)."""
    folder = tmp_path_factory.mktemp("packages")
    pipe = Pipeline.from_pretrained(tiny_current, safety_checker=None, compile=True, compile_cache=folder)
    eager = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    return folder, generate(pipe), generate(eager)


def packages(folder: Path, part: str = "unet") -> list[Path]:
    return sorted(folder.glob(f"{part}-*.pt2"))


def test_one_package_matches_eager_and_holds_the_weights_once(packaged, tiny_current):
    folder, compiled, eager = packaged
    assert np.abs(compiled - eager).max() <= TOL
    [package] = packages(folder)
    weights = sum(f.stat().st_size for f in (tiny_current / "unet").glob("*.safetensors"))
    # float32 weights in a memory-mapped file: packaged as a whole file per weight, this was 190x
    assert package.stat().st_size < 3 * weights + 8e6, (package.stat().st_size, weights)
    [decoder] = packages(folder, "vae-decoder")  # the VAE decoder is kept too (compiling.py)
    vae_weights = sum(f.stat().st_size for f in (tiny_current / "vae").glob("*.safetensors"))
    assert decoder.stat().st_size < 3 * vae_weights + 8e6, (decoder.stat().st_size, vae_weights)


def test_another_process_loads_the_package_without_compiling(packaged, tiny_current, tmp_path):
    folder, compiled, _ = packaged
    script = textwrap.dedent(f"""
        import logging, sys
        import numpy as np, torch
        import torch._inductor
        def refuse(*args, **kwargs):
            raise SystemExit("compiled again instead of loading the package")
        torch._inductor.aoti_compile_and_package = refuse
        torch._dynamo.config.error_on_recompile = True
        torch.set_num_threads({torch.get_num_threads()})  # as here: the eager parts' sums alike
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from minisd.pipeline import Pipeline
        pipe = Pipeline.from_pretrained({str(tiny_current)!r}, safety_checker=None, compile=True,
                                        compile_cache={str(folder)!r})
        images = [pipe(prompt, generator=torch.Generator().manual_seed(seed), **{RUN!r}).images
                  for prompt, seed in (("a red cube", 0), ("a blue ball, another prompt", 1))]
        np.save({str(tmp_path / "images.npy")!r}, images[0])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded the compiled unet from" in done.stderr and "loaded the compiled vae-decoder from" in done.stderr
    assert np.array_equal(np.load(tmp_path / "images.npy"), compiled)  # the very same code and weights
    # a second prompt and seed of the same size: the same packages
    assert len(packages(folder)) == len(packages(folder, "vae-decoder")) == 1


def test_the_package_runs_as_torch_loads_it_with_its_weights_on_cache_lines(packaged, tiny_current):
    folder, _, _ = packaged
    [path] = packages(folder)
    aligned, reference = load_package(path), torch._inductor.aoti_load_package(str(path))
    assert isinstance(aligned, AlignedPackage)
    # every uniquely named constant re-homed, on a 64-byte boundary (torch's loader: 16 mod 64 for a large block)
    names = aligned.runner.get_constant_names_to_original_fqns()
    assert len(aligned.constants) == len(names) > 10
    assert {byte_range(constant)[0] % 64 for constant in aligned.constants.values()} == {0}
    config = json.loads((tiny_current / "unet" / "config.json").read_text())
    generator = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, config["in_channels"], 8, 8, generator=generator), torch.tensor(500.0),
              torch.randn(2, 77, config["cross_attention_dim"], generator=generator))
    with torch.no_grad():
        expected = reference(*inputs)
        assert torch.equal(aligned(*inputs), expected)  # the same code on the same weights: bit for bit
        assert torch.equal(aligned(*inputs), expected)  # and again, after the old pages were released


def test_release_pages_frees_whole_pages_inside_the_ranges_only():
    page = mmap.PAGESIZE
    block = torch.ones(12 * page, dtype=torch.uint8)
    base = block.data_ptr()
    start = -(-base // page) * page - base  # the block's first page boundary, as an offset
    kept_slot = start + 6 * page + 100  # a 64-byte slot between two ranges, as a scalar constant holds
    ranges = [(base + start + 10, 3 * page),  # joined with the next: less than 64 bytes apart
              (base + start + 3 * page + 50, kept_slot - start - 3 * page - 50),
              (base + kept_slot + 64, 4 * page)]
    released = release_pages(ranges)
    values = block.numpy()
    zero_pages = [i for i in range(11)
                  if not values[start + i * page: start + (i + 1) * page].any()]
    # pages 1-5 lie wholly inside the joined first span; page 6 holds the kept slot; 7-9 inside the last
    assert zero_pages == [1, 2, 3, 4, 5, 7, 8, 9] and released == 8 * page
    assert values[: start + page].all() and values[start + 6 * page: start + 7 * page].all()
    assert values[start + 10 * page:].all()


def test_a_corrupt_package_is_compiled_again_and_replaced(packaged, tiny_current, tmp_path, monkeypatch):
    folder, compiled, _ = packaged
    broken = tmp_path / "cache"
    broken.mkdir()
    [package], [decoder] = packages(folder), packages(folder, "vae-decoder")
    (broken / package.name).write_bytes(package.read_bytes()[: package.stat().st_size // 2])  # a cut copy
    (broken / decoder.name).write_bytes(decoder.read_bytes())  # and a whole one
    builds = []

    def build(program, package_path, inductor_configs):  # the real compile is the fixture's: its result
        builds.append(package_path)
        Path(package_path).write_bytes(package.read_bytes())
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", build)
    pipe = Pipeline.from_pretrained(tiny_current, safety_checker=None, compile=True, compile_cache=broken)
    with pytest.warns(UserWarning, match=f"{package.name}.*could not be loaded.*compiling it again"):
        images = generate(pipe)
    assert len(builds) == 1 and Path(builds[0]).parent == broken  # written beside, then renamed over
    assert np.array_equal(images, compiled)
    assert [p.name for p in packages(broken)] == [package.name]
    assert (broken / package.name).read_bytes() == package.read_bytes()
    assert sorted(p.name for p in broken.iterdir()) == sorted([package.name, decoder.name])  # no temporary file left


def test_no_package_without_a_cache_or_with_autograd(tiny_current, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISD_COMPILE_CACHE", "off")
    assert cache_folder(None) is None and cache_folder(False) is None
    assert cache_folder(tmp_path) == tmp_path
    monkeypatch.setenv("MINISD_COMPILE_CACHE", str(tmp_path / "env"))
    assert cache_folder(None) == tmp_path / "env"
    assert cache_folder(False) is None
    monkeypatch.delenv("MINISD_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder(None) == tmp_path / "xdg" / "minisd" / "compiled"


def test_the_key_follows_weights_layers_shapes_and_settings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8))
    x = (torch.randn(1, 4, 8, 8),)
    key = fingerprint(model, x, {"freezing": True})
    twin = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8))
    twin.load_state_dict(model.state_dict())
    assert fingerprint(twin, x, {"freezing": True}) == key
    assert fingerprint(model, (torch.randn(2, 4, 8, 8),), {"freezing": True}) != key
    assert fingerprint(model, (x[0].double(),), {"freezing": True}) != key
    assert fingerprint(model, x, {"freezing": False}) != key
    with torch.no_grad():
        twin[0].weight[0, 0, 0, 0] += 1e-6  # one number of one weight
    assert fingerprint(twin, x, {"freezing": True}) != key
    other = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8))
    other.load_state_dict(model.state_dict())
    assert fingerprint(other, x, {"freezing": True}) != key  # same weights, another layer


def test_the_key_follows_the_cpus_matrix_instructions(monkeypatch):
    """A package built where AMX is (this project's Intel machine) must not load where it is not
    (its AMD machine): both read AVX512 as torch's dispatch capability."""
    model, x = nn.Linear(4, 4), (torch.randn(2, 4),)
    key = fingerprint(model, x, {})
    amx = torch.cpu._is_amx_tile_supported()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not amx)
    assert fingerprint(model, x, {}) != key


def test_own_storages_copies_views_for_the_block_only():
    base = torch.randn(3, 256)
    layer = nn.Linear(16, 16, bias=False)
    layer.weight = nn.Parameter(base[0].view(16, 16))  # a view into a larger storage
    layer.extra = base[1, :16]  # a tensor attribute, also a view
    before = (layer.weight, layer.extra)
    with own_storages(layer):
        assert layer.weight.untyped_storage().nbytes() == 16 * 16 * 4
        assert isinstance(layer.weight, nn.Parameter)
        assert torch.equal(layer.weight, before[0]) and torch.equal(layer.extra, before[1])
        assert layer.extra.untyped_storage().nbytes() == 16 * 4
    assert layer.weight is before[0] and layer.extra is before[1]


def test_a_failed_compile_leaves_no_file(tmp_path):
    cache = PackageCache(tmp_path)

    def export():
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cache.load_or_build("unet", "k", export, {})
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_falls_back_to_compiling_in_process(tiny_current, tmp_path):
    from minisd import load_unet
    from minisd.compile_cache import CachedUNetCall

    unet = load_unet(tiny_current)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("a user's file, not a folder")
    calls = []

    def in_process(*args):  # stands in for torch.compile's call
        calls.append(args)
        return unet.forward(*args)

    cached = CachedUNetCall(unet, in_process, {"freezing": True}, PackageCache(not_a_folder / "cache"))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="cannot be kept in .*file/cache.*compiling it in this process"):
            got = cached(x, 10, ctx)
        assert torch.allclose(got, unet(x, 10, ctx), atol=1e-6) and len(calls) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fallback is remembered for the shape: no retry, no warning
            cached(x, 10, ctx)
        assert len(calls) == 2 and not_a_folder.read_text() == "a user's file, not a folder"
        hook = unet.register_forward_pre_hook(lambda module, inputs: None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a hooked UNet, a new shape: no package tried, no warning
            cached(torch.randn(1, 4, 8, 8, generator=g), 10, ctx[:1])
        hook.remove()
    assert len(calls) == 3  # straight to the in-process call, which runs the hooks itself


def test_the_decoder_package_serves_a_call_with_one_latent_tensor_only(tiny_current):
    from minisd import load_vae
    from minisd.compile_cache import CachedDecoderCall

    decoder = load_vae(tiny_current, channels_last=True).decoder
    cached = CachedDecoderCall(decoder, None, {}, PackageCache(Path("unused")))
    z = torch.randn(1, decoder.conv_in.in_channels, 8, 8)
    [plain] = cached.plain_inputs((z,), {})
    assert plain.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, z)  # as its convolutions
    assert torch.equal(cached.plain_inputs((), {"z": z})[0], z)
    for args, kwargs in (((z, z), {}), ((), {}), ((z,), {"z": z}), ((), {"latents": z}), (("z",), {})):
        assert cached.plain_inputs(args, kwargs) is None  # the in-process compile takes those


def test_an_export_leaves_the_einops_backend_table_as_it_found_it():
    """torch.compile guards on the table's length where it traced einops: an export that grew it
    made the compiled step-skipping UNets compile again (tests/test_step_skipping.py)."""
    import einops
    import einops._backends
    from torch._subclasses.fake_tensor import FakeTensorMode

    from minisd.compile_cache import einops_cache_as_found

    table = einops._backends._type2backend
    einops.rearrange(torch.zeros(2, 3), "a b -> b a")
    before = dict(table)
    with einops_cache_as_found():
        with FakeTensorMode():
            einops.rearrange(torch.zeros(2, 3), "a b -> b a")
        assert len(table) > len(before)  # einops met a new tensor type, as it does in an export
    assert table == before
