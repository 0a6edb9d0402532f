"""Step skipping (minisd/step_skipping.py): T-GATE's `gate_step` and DeepCache's
`cache_interval` / `cache_branch`, on tiny random pipelines (8x8 latents and odd sizes, a few
steps, fp32 CPU).

Pinned down:
  - off is off: no new keyword, or all of them None, is the plain pipeline bit for bit, and
    `cache_interval=1` (every step full, through the cut UNet) is too;
  - SkippingUNet, the cut UNet: a full step is the UNet bit for bit at every skip branch, a
    shallow step fed fresh deep features is too (odd latent sizes, layers_per_block 1 and 2,
    with and without the speed levers), a step fed recorded cross-attention outputs is too,
    and a shallow step runs exactly the layers the branch numbering says;
  - in the pipeline: after the gate the UNet sees batch 1 and does no cross-attention work;
    full and shallow steps follow the documented rule; the frozen cross-attention is the mean
    of the unconditional and conditional outputs at step gate_step - 1 (batched CFG, two-pass
    CFG, no CFG) and is what the gated steps use;
  - bad settings are InputErrors naming the argument; an unreached gate warns and changes nothing;
  - combinations (several images per prompt, no CFG, img2img) run, img2img counting steps over
    the steps it runs.
"""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

import minisd.pipeline
from minisd import SpeedLevers, load_unet
from minisd.errors import InputError
from minisd.fast import apply_levers
from minisd.pipeline import Pipeline
from minisd.step_skipping import SkippingUNet, count_branches

STEPS = 6
PROMPT = "a red cube on a table"


def lpb_kwargs(layers_per_block: int) -> dict:
    return {} if layers_per_block == 1 else {"unet": {"layers_per_block": layers_per_block}}


@pytest.fixture(scope="module")
def pipes(make_tiny):
    """pipes(layers_per_block=1, levers="all") -> a Pipeline, loaded once per module."""
    cache = {}

    def get(layers_per_block: int = 1, levers: str = "all") -> Pipeline:
        key = (layers_per_block, levers)
        if key not in cache:
            folder = make_tiny("current", **lpb_kwargs(layers_per_block))
            lever_set = SpeedLevers() if levers == "all" else SpeedLevers.none()
            cache[key] = Pipeline.from_pretrained(folder, safety_checker=None, levers=lever_set)
        return cache[key]

    return get


def generate(pipe: Pipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "latent", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def picture(width: int = 64, height: int = 64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / (width - 1), y / (height - 1), 0.5 + 0.5 * np.sin((x + y) / 7)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def cross_attentions(unet) -> list:
    """Every cross-attention layer (a transformer block's attn2), in module order."""
    return [module for name, module in unet.named_modules() if name.endswith(".attn2")]


@contextlib.contextmanager
def hooked(hooks):
    """Register (module, kind, fn) hooks, kind "pre" or "post"; removed on exit."""
    handles = [module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn)
               for module, kind, fn in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class StepCounter:
    """Counts per sampling step (advanced by callback_on_step_end) how modules are called."""

    def __init__(self):
        self.step = 0
        self.batches: dict[int, list[int]] = {}  # step -> batch sizes seen by conv_in
        self.calls: dict[str, dict[int, int]] = {}  # name -> step -> calls

    def callback(self, pipe, i, t, tensors):
        assert i == self.step
        self.step += 1
        return tensors

    def count(self, name):
        def hook(module, args, *rest):
            per_step = self.calls.setdefault(name, {})
            per_step[self.step] = per_step.get(self.step, 0) + 1
        return hook

    def batch_hook(self, module, args):
        self.batches.setdefault(self.step, []).append(args[0].shape[0])

    def calls_at(self, name, step) -> int:
        return self.calls.get(name, {}).get(step, 0)


def counted_run(pipe: Pipeline, **kwargs) -> tuple[StepCounter, torch.Tensor]:
    """A generation with conv_in's input batch, every cross-attention projection and the mid
    block (which only full steps run) and the last down block counted per step."""
    counter = StepCounter()
    hooks = [(pipe.unet.conv_in, "pre", counter.batch_hook),
             (pipe.unet.mid_block.resnets[0], "pre", counter.count("mid")),
             (pipe.unet.down_blocks[-1].resnets[0], "pre", counter.count("deep_down"))]
    for attention in cross_attentions(pipe.unet):
        for layer in (attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]):
            hooks.append((layer, "pre", counter.count("cross")))
    with hooked(hooks):
        latents = generate(pipe, callback_on_step_end=counter.callback, **kwargs)
    return counter, latents


def expected_full_steps(steps: int, gate_step: int | None, interval: int | None) -> set[int]:
    """step_skipping's documented rule, written out independently: full at i % N == 0 before
    the gate, at gate_step - 1, and every N-th step counted from the gate."""
    full = set()
    for i in range(steps):
        if interval is None or (gate_step is not None and i == gate_step - 1):
            full.add(i)
        elif gate_step is not None and i >= gate_step:
            if (i - gate_step) % interval == 0:
                full.add(i)
        elif i % interval == 0:
            full.add(i)
    return full


# --- 1, 2: off is off -------------------------------------------------------------------

def test_defaults_unchanged(pipes):
    pipe = pipes()
    plain = generate(pipe)
    assert torch.equal(generate(pipe, gate_step=None, cache_interval=None), plain)
    assert torch.equal(generate(pipe, gate_step=None, cache_interval=None, cache_branch=None), plain)
    assert pipe.skipping_models == {}  # off: the plain UNet ran, no cut UNet was made


@pytest.mark.parametrize("layers_per_block", [1, 2])
@pytest.mark.parametrize("case", ["txt2img", "txt2img_odd", "img2img"])
def test_cache_interval_1_is_the_plain_pipeline(pipes, layers_per_block, case):
    """cache_interval=1: every step full, through SkippingUNet instead of the UNet: same bits."""
    pipe = pipes(layers_per_block)
    kwargs = {"txt2img": {}, "txt2img_odd": {"height": 40, "width": 56},  # 5x7 latents
              "img2img": {"image": picture(), "strength": 0.7}}[case]
    plain = generate(pipe, **kwargs)
    cached = generate(pipe, cache_interval=1, **kwargs)
    assert torch.equal(cached, plain)
    for branch in (0, count_branches(pipe.unet) - 1):
        assert torch.equal(generate(pipe, cache_interval=1, cache_branch=branch, **kwargs), plain)


# --- 3: SkippingUNet against the UNet -----------------------------------------------------

@pytest.fixture(scope="module")
def unets(make_tiny):
    cache = {}

    def get(layers_per_block: int, levers: str):
        key = (layers_per_block, levers)
        if key not in cache:
            folder = make_tiny("current", **lpb_kwargs(layers_per_block))
            unet = load_unet(folder, channels_last=levers == "all")
            apply_levers(SpeedLevers() if levers == "all" else SpeedLevers.none(), unet)
            cache[key] = unet
        return cache[key]

    return get


def unet_inputs(height: int, width: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, height, width, generator=g), torch.tensor(601), torch.randn(batch, 77, 32, generator=g)


LATENT_SIZES = [(8, 8), (12, 10), (6, 14)]  # 12x10: 12->6->3, 10->5->3; 6x14: 6->3->2, 14->7->4


@pytest.mark.parametrize("levers", ["none", "all"])
@pytest.mark.parametrize("layers_per_block", [1, 2])
@pytest.mark.parametrize("size", LATENT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@torch.no_grad()
def test_skipping_unet_full_and_fresh_shallow_steps_are_the_unet(unets, levers, layers_per_block, size):
    unet = unets(layers_per_block, levers)
    x, t, ctx = unet_inputs(*size)
    expected = unet(x, t, ctx)
    branches = count_branches(unet)
    assert branches == 1 + 3 * layers_per_block + 2  # conv_in, each down resnet, two downsamplers
    for branch in range(branches):
        model = SkippingUNet(unet, branch)
        noise, deep, recorded = model(x, t, ctx)
        assert recorded is None
        assert torch.equal(noise, expected), f"full step, branch {branch}"
        shallow, deep_again, _ = model(x, t, ctx, deep=deep)
        assert torch.equal(shallow, expected), f"shallow step from fresh features, branch {branch}"
        assert deep_again is deep  # a shallow step hands the cache back unchanged
    # the default branch is 0, the outermost: a shallow step runs the last up layer only
    assert SkippingUNet(unet).branch == 0
    assert torch.equal(SkippingUNet(unet)(x, t, ctx)[0], expected)


@pytest.mark.parametrize("levers", ["none", "all"])
@pytest.mark.parametrize("layers_per_block", [1, 2])
@torch.no_grad()
def test_skipping_unet_with_recorded_cross_attention_is_the_full_step(unets, levers, layers_per_block):
    unet = unets(layers_per_block, levers)
    x, t, ctx = unet_inputs(12, 10)
    expected = unet(x, t, ctx)
    # the cross-attention outputs of the plain UNet, in the order it runs them
    seen = []
    layers = cross_attentions(unet)
    with hooked([(layer, "post", lambda m, a, out: seen.append(out.clone())) for layer in layers]):
        unet(x, t, ctx)
    assert len(seen) == len(layers) == 2 * layers_per_block + 1 + 2 * (layers_per_block + 1)

    model = SkippingUNet(unet)
    noise, deep, recorded = model(x, t, ctx, record=True)
    assert torch.equal(noise, expected)  # recording changes nothing
    assert len(recorded) == len(seen)
    for k, (ours, theirs) in enumerate(zip(recorded, seen)):
        assert torch.equal(ours, theirs), f"cross-attention layer {k} recorded out of order or wrong"
    # given the recorded outputs, the context is not used at all
    assert torch.equal(model(x, t, None, cross=recorded)[0], expected)
    assert torch.equal(model(x, t, ctx, deep=deep, cross=recorded)[0], expected)
    # and they are used: other cross-attention outputs give another prediction
    other = tuple(torch.zeros_like(c) for c in recorded)
    assert not torch.equal(model(x, t, None, cross=other)[0], expected)
    with hooked([(layer, "pre", lambda m, a: pytest.fail("cross-attention ran")) for layer in layers]):
        model(x, t, None, cross=recorded)


@pytest.mark.parametrize("layers_per_block", [1, 2])
@torch.no_grad()
def test_shallow_step_runs_the_layers_the_branch_names(unets, layers_per_block):
    """Branch b: a shallow step runs the first b down layers (resnets with their attention,
    downsamplers, in order) and the last b+1 up resnets, never the middle."""
    unet = unets(layers_per_block, "none")
    down = [m for block in unet.down_blocks
            for m in [*block.resnets, *(block.downsamplers or [])]]
    up = [m for block in unet.up_blocks for m in block.resnets]
    assert len(down) + 1 == count_branches(unet) == len(up)
    x, t, ctx = unet_inputs(8, 8, batch=1)
    ran = []
    hooks = [(m, "pre", lambda m, a: ran.append(m)) for m in [*down, *up, unet.mid_block.resnets[0]]]
    for branch in range(count_branches(unet)):
        model = SkippingUNet(unet, branch)
        deep = model(x, t, ctx)[1]
        ran.clear()
        with hooked(hooks):
            model(x, t, ctx, deep=deep)
        assert ran == down[:branch] + up[len(up) - branch - 1:], f"branch {branch}"


# --- 4: what the pipeline asks of the UNet at each step -------------------------------------

@pytest.mark.parametrize("levers", ["all", "none"])
@pytest.mark.parametrize("gate_step", [1, 3, 5])
def test_after_the_gate_batch_1_and_no_cross_attention(pipes, levers, gate_step):
    pipe = pipes(1, levers)
    counter, latents = counted_run(pipe, guidance_scale=7.5, gate_step=gate_step)
    assert counter.step == STEPS
    for i in range(STEPS):
        if i < gate_step:
            assert counter.batches[i] == [2], f"step {i}: CFG batch before the gate"
            assert counter.calls_at("cross", i) > 0, f"step {i}"
        else:
            assert counter.batches[i] == [1], f"step {i}: latents alone after the gate"
            assert counter.calls_at("cross", i) == 0, f"step {i}: cross-attention after the gate"
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.parametrize("steps, gate_step, interval, branch", [
    (7, None, 3, None), (10, 5, 3, None), (6, 2, 2, None), (8, 3, 4, 0), (8, 3, 4, "last"), (5, 1, 2, None)])
def test_full_and_shallow_steps_follow_the_rule(pipes, steps, gate_step, interval, branch):
    pipe = pipes()
    if branch == "last":
        branch = count_branches(pipe.unet) - 1
    counter, latents = counted_run(pipe, num_inference_steps=steps, gate_step=gate_step,
                                   cache_interval=interval, cache_branch=branch)
    full = expected_full_steps(steps, gate_step, interval)
    assert 0 < len(full) < steps
    mid = {i for i in range(steps) if counter.calls_at("mid", i)}
    assert mid == full
    assert all(counter.calls_at("mid", i) == 1 for i in full)  # one batched UNet call per step
    # a shallow step at the default branch (0) stays out of the deeper down blocks
    if branch is None:
        assert {i for i in range(steps) if counter.calls_at("deep_down", i)} == full
    for i in range(steps):
        gated = gate_step is not None and i >= gate_step
        assert counter.batches[i] == [1 if gated else 2], f"step {i}"
        assert (counter.calls_at("cross", i) == 0) == gated, f"step {i}"
    assert torch.isfinite(latents).all()


# --- 5: the frozen cross-attention -------------------------------------------------------

NEGATIVE_100_WORDS = " ".join(["blurry", "dark", "noisy", "ugly"] * 25)


@pytest.mark.parametrize("case", ["batched_cfg", "two_pass_cfg", "no_cfg", "two_images"])
def test_frozen_cross_attention_is_the_mean_at_the_step_before_the_gate(pipes, monkeypatch, case):
    pipe = pipes()
    gate_step = 3
    kwargs = {"batched_cfg": {},
              "two_pass_cfg": {"prompt_syntax": "a1111", "negative_prompt": NEGATIVE_100_WORDS},
              "no_cfg": {"guidance_scale": 1.0},
              "two_images": {"num_images_per_prompt": 2, "negative_prompt": "grey"}}[case]
    if case == "two_pass_cfg":  # the contexts really differ in length, so CFG runs two passes
        uncond = pipe.encode_prompt(NEGATIVE_100_WORDS, prompt_syntax="a1111")
        assert uncond.shape[1] > pipe.encode_prompt(PROMPT, prompt_syntax="a1111").shape[1]

    made = []  # the pipeline's StepSkipping for this generation

    def capture(*args, **kw):
        made.append(real(*args, **kw))
        return made[-1]

    real = minisd.pipeline.step_skipping_for
    monkeypatch.setattr(minisd.pipeline, "step_skipping_for", capture)

    counter = StepCounter()
    outputs = []  # every cross-attention output at step gate_step - 1, in call order
    gated_in, gated_out = [], []  # the UNet's input and prediction at the first gated step

    def keep_cross(module, args, out):
        if counter.step == gate_step - 1:
            outputs.append(out.clone())

    def keep_in(module, args):
        if counter.step == gate_step:
            gated_in.append(args[0].clone())

    def keep_out(module, args, out):
        if counter.step == gate_step:
            gated_out.append(out.clone())

    layers = cross_attentions(pipe.unet)
    hooks = [(layer, "post", keep_cross) for layer in layers]
    hooks += [(pipe.unet.conv_in, "pre", keep_in), (pipe.unet.conv_out, "post", keep_out)]
    with hooked(hooks):
        generate(pipe, gate_step=gate_step, callback_on_step_end=counter.callback, **kwargs)

    (skipping,) = made
    n = kwargs.get("num_images_per_prompt", 1)
    if case == "two_pass_cfg":  # the unconditional pass, then the conditional one
        assert len(outputs) == 2 * len(layers)
        expected = [(u + c) / 2 for u, c in zip(outputs[:len(layers)], outputs[len(layers):])]
    elif case == "no_cfg":  # nothing to average
        assert len(outputs) == len(layers)
        expected = outputs
    else:  # one batch [uncond; cond]
        assert len(outputs) == len(layers)
        expected = [(out[:n] + out[n:]) / 2 for out in outputs]
    assert skipping.frozen is not None and len(skipping.frozen) == len(layers)
    for k, (frozen, mean) in enumerate(zip(skipping.frozen, expected)):
        assert frozen.shape[0] == n
        assert torch.equal(frozen, mean), f"cross-attention layer {k}"

    # ... and the first gated step is the cut UNet on the latents alone with these outputs
    (sample,), (noise,) = gated_in, gated_out
    assert sample.shape[0] == n
    t = pipe.scheduler.timesteps[gate_step]
    with torch.no_grad():
        assert torch.equal(SkippingUNet(pipe.unet)(sample, t, None, cross=tuple(expected))[0], noise)


# --- 6: bad settings ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"gate_step": 0}, "gate_step"), ({"gate_step": -1}, "gate_step"), ({"gate_step": 1.5}, "gate_step"),
    ({"gate_step": True}, "gate_step"), ({"gate_step": "3"}, "gate_step"),
    ({"cache_interval": 0}, "cache_interval"), ({"cache_interval": -2}, "cache_interval"),
    ({"cache_interval": 2.0}, "cache_interval"), ({"cache_interval": False}, "cache_interval"),
    ({"cache_interval": 2, "cache_branch": -1}, "cache_branch"),
    ({"cache_interval": 2, "cache_branch": 6}, r"cache_branch.*0 to 5"),
    ({"cache_interval": 2, "cache_branch": 1.0}, "cache_branch"),
    ({"cache_branch": 1}, "cache_branch.*cache_interval"),
], ids=repr)
def test_bad_settings_are_input_errors(pipes, kwargs, match):
    pipe = pipes()
    with pytest.raises(InputError, match=match):
        generate(pipe, **kwargs)


def test_cache_branch_range_follows_the_unet(pipes):
    pipe = pipes(2)
    last = count_branches(pipe.unet) - 1
    assert last == 8
    with pytest.raises(InputError, match=r"cache_branch.*0 to 8.*got 9"):
        generate(pipe, cache_interval=2, cache_branch=9)
    assert torch.isfinite(generate(pipe, cache_interval=2, cache_branch=last)).all()


@pytest.mark.parametrize("gate_step", [STEPS, STEPS + 4])
@pytest.mark.parametrize("interval", [None, 1])
def test_unreached_gate_warns_and_changes_nothing(pipes, gate_step, interval):
    pipe = pipes()
    plain = generate(pipe)
    with pytest.warns(UserWarning, match=f"gate_step={gate_step}"):
        latents = generate(pipe, gate_step=gate_step, cache_interval=interval)
    assert torch.equal(latents, plain)


def test_reached_gate_does_not_warn_and_changes_the_output(pipes, recwarn):
    pipe = pipes()
    gated = generate(pipe, gate_step=STEPS - 1)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning) and "gate_step" in str(w.message)]
    assert not torch.equal(gated, generate(pipe))


# --- 7: combinations -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, shape", [
    ({"num_images_per_prompt": 2}, (2, 4, 8, 8)),
    ({"guidance_scale": 1.0}, (1, 4, 8, 8)),
    ({"prompt": ["a cat", "a dog"], "height": 40, "width": 56}, (2, 4, 5, 7)),
    ({"prompt_syntax": "a1111", "negative_prompt": NEGATIVE_100_WORDS}, (1, 4, 8, 8)),
], ids=["two_images", "no_cfg", "two_prompts_odd_size", "two_pass_cfg"])
def test_gate_and_cache_together_run(pipes, kwargs, shape):
    pipe = pipes()
    counter, latents = counted_run(pipe, num_inference_steps=8, gate_step=4, cache_interval=2, **kwargs)
    assert latents.shape == shape and torch.isfinite(latents).all()
    assert {i for i in range(8) if counter.calls_at("mid", i)} == expected_full_steps(8, 4, 2)
    assert all(counter.calls_at("cross", i) == 0 for i in range(4, 8))
    # reproducible: same seed, same bits
    assert torch.equal(latents, generate(pipe, num_inference_steps=8, gate_step=4, cache_interval=2, **kwargs))


def test_no_cfg_gate_keeps_the_batch(pipes):
    counter, _ = counted_run(pipes(), guidance_scale=1.0, gate_step=2)
    assert all(counter.batches[i] == [1] for i in range(STEPS))
    assert all(counter.calls_at("cross", i) > 0 for i in range(2))
    assert all(counter.calls_at("cross", i) == 0 for i in range(2, STEPS))


def test_img2img_counts_steps_over_the_steps_it_runs(pipes):
    pipe = pipes()
    image = picture()
    # 10 steps at strength 0.5: the last 5 run; the gate at 3 falls on the 4th of those
    counter, latents = counted_run(pipe, image=image, strength=0.5, num_inference_steps=10, gate_step=3)
    assert counter.step == 5
    assert [counter.batches[i] for i in range(5)] == [[2], [2], [2], [1], [1]]
    assert [counter.calls_at("cross", i) > 0 for i in range(5)] == [True, True, True, False, False]
    assert torch.isfinite(latents).all()
    # with a cache too: the rule over the steps that run
    counter, _ = counted_run(pipe, image=image, strength=0.5, num_inference_steps=10, gate_step=3,
                             cache_interval=2)
    assert {i for i in range(5) if counter.calls_at("mid", i)} == expected_full_steps(5, 3, 2)
    # a gate at the 5th of 5 steps that run (of 10 scheduled) is never reached: warns, no change
    plain = generate(pipe, image=image, strength=0.5, num_inference_steps=10)
    with pytest.warns(UserWarning, match="gate_step=5"):
        unreached = generate(pipe, image=image, strength=0.5, num_inference_steps=10, gate_step=5)
    assert torch.equal(unreached, plain)


COMPILED_TOL = 1e-3  # images in [0, 1], compiled against eager, float32 (Inductor reorders float sums)


def test_compiled_step_skipping_matches_eager_and_never_recompiles(tiny_current):
    """compile=True compiles the cut UNet like the UNet: a recording step, a gated full step and
    a gated shallow step (gate_step=1, cache_interval=2, 3 steps) each compile once, then a
    second prompt and seed reuse them."""
    torch._dynamo.reset()
    eager = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    compiled = Pipeline.from_pretrained(tiny_current, safety_checker=None, compile=True)
    run = dict(num_inference_steps=3, output_type="np", height=64, width=64, gate_step=1, cache_interval=2)
    for prompt, seed in (("a red cube", 0), ("another prompt, same size", 1)):
        recompiles = torch._dynamo.config.patch(error_on_recompile=True) if seed else contextlib.nullcontext()
        with recompiles:
            got = compiled(prompt, generator=torch.Generator().manual_seed(seed), **run).images
        want = eager(prompt, generator=torch.Generator().manual_seed(seed), **run).images
        assert np.abs(got - want).max() <= COMPILED_TOL
    assert compiled.skipping_models[None].compiled
