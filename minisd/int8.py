"""Static int8 for the UNet on x86 CPUs: PyTorch's PT2E quantization, lowered by Inductor to
oneDNN's int8 convolutions and matrix products.

    pipe = Pipeline.from_pretrained(folder, dtype=torch.bfloat16, quantize="int8")
    pipe("a red cube")   # the first image of a size calibrates, quantizes and compiles

The flow (https://pytorch.org/tutorials/prototype/pt2e_quant_x86_inductor.html), per input
shape of the UNet:
1. export: torch.export traces the float32 UNet at that shape into one graph;
2. prepare: the x86 Inductor quantizer marks every convolution and linear for int8, weights
   per output channel and activations per tensor, and puts an observer on each activation;
3. calibrate: the observers watch the UNet's real inputs from a few generations the pipeline
   ran itself (fixed prompts and seeds at the requested size, `calibration_prompts` to choose
   your own), recorded before the first int8 image of that size;
4. convert: observed ranges become scales and zero points, the graph quantize/dequantize pairs;
5. compile: Inductor with freezing fuses each pair with its convolution or linear into one
   oneDNN int8 kernel (compiling.py says why freezing); ahead of time by AOTInductor into the
   package cache (compile_cache.py), so that a later process with the same weights and
   calibration loads it after calibrating, or in this process with `compile_cache=False`.
Activations between the int8 kernels (attention, normalisation, SiLU) run in bfloat16 under
autocast for a bfloat16 pipeline (int8-mixed-bf16), else in float32; the UNet's inputs and
output are cast from and back to the pipeline's dtype.

The PT2E flow lives in torchao since torch 2.10 dropped its own copy: an optional extra
(`pip install "minisd[int8]"`), imported only here and only when quantization is asked for.
Calibration costs about as much as the float generations it records plus one observed UNet
call per recorded step; compiling then takes about as long as for the float UNet.
"""
from __future__ import annotations

import copy
import logging
import math
import platform
import warnings
from pathlib import Path

import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

from .compile_cache import (PackageCache, cache_folder, compact_storages, einops_cache_as_found, fingerprint,
                            tensors_digest)
from .compiling import WithInductorSettings, inductor_settings
from .errors import InputError
from .fast import FusedSelfAttention, swap_layers, uncache_cross_kv

log = logging.getLogger("minisd")

METHODS = ("int8",)
# Calibration: a handful of generations of differing subjects and styles, fixed so that two
# runs quantize alike. Each records every CFG UNet call of its steps.
CALIBRATION_PROMPTS = (
    "a photograph of a red fox standing in fresh snow",
    "an oil painting of a busy city street at night, rain, reflections",
    "a close-up portrait of an old fisherman, studio lighting",
    "a bowl of fruit on a wooden kitchen table, watercolor",
)
CALIBRATION_SEED = 20240
CALIBRATION_STEPS = 10
MAX_OBSERVED_CALLS = 16  # observer passes per shape, spread evenly over the recorded calls


def check_quantize(method, device: torch.device) -> None:
    if method not in METHODS:
        raise InputError(f"quantize: must be one of {', '.join(map(repr, METHODS))} or None, got {method!r:.80}")
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise InputError(f"quantize={method!r}: runs on x86 CPUs (oneDNN's int8 kernels through Inductor); "
                         f"this pipeline is on {device.type} ({platform.machine()})")


def load_pt2e():
    """torchao's PT2E functions, or a clear error naming the extra to install."""
    # torchao's import logs a warning for each CUDA kernel library it cannot load on a CPU
    # machine, and torch one for each enum torchao registers: noise to a user of the CPU path.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        quantizer = default_quantizer()
    except ImportError as e:
        raise InputError("quantize='int8' needs torchao, which holds PyTorch's PT2E int8 flow: "
                         "pip install \"minisd[int8]\" (or pip install torchao)") from e
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return prepare_pt2e, convert_pt2e, quantizer


def default_quantizer():
    """torchao's x86 Inductor quantizer as minisd sets it: every convolution and linear int8."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    return x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())


def check_calibration_prompts(prompts) -> tuple[str, ...]:
    if prompts is None:
        return CALIBRATION_PROMPTS
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = tuple(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError("calibration_prompts: expected a non-empty list of non-empty prompts")
    return prompts


class Int8UNet:
    """Stands in for the UNet in a pipeline: called as the UNet is, it runs the int8 graph
    made for the inputs' shapes. Every other attribute (config, parameters, `.to`, ...) is the
    float UNet's, which calibration runs and which stays the model's source of truth."""

    def __init__(self, unet: nn.Module, calibration_prompts=None, cache: str | Path | bool | None = None):
        self.float_unet = unet
        self.calibration_prompts = check_calibration_prompts(calibration_prompts)
        folder = cache_folder(cache)  # compiled int8 UNets kept on disk (compile_cache.py); None: not kept
        self._packages = None if folder is None else PackageCache(folder)
        self._pt2e = load_pt2e()
        # Activations between the int8 kernels: bfloat16 for a bfloat16 pipeline (oneDNN's
        # int8-mixed-bf16 kernels), else float32; chosen here, kept if the pipeline moves.
        self.activations = torch.bfloat16 if unet.conv_in.weight.dtype == torch.bfloat16 else torch.float32
        self._records: dict[tuple[int, int], list[tuple]] = {}  # (latent h, w) -> recorded UNet inputs
        self._graphs: dict[tuple, object] = {}  # input shapes -> compiled int8 graph

    def __getattr__(self, name):
        return getattr(self.__dict__["float_unet"], name)

    def __repr__(self) -> str:
        return f"Int8UNet({len(self._graphs)} int8 graph(s), float UNet {type(self.float_unet).__name__})"

    def float32_source(self) -> nn.Module:
        """What export traces: a float32 copy of the UNet. A copy even when the UNet is float32:
        the exported graph keeps references to its parameters, and `Pipeline.to(dtype)` must
        not convert them under the int8 graph. Its cross-attention is made plain: the copy is
        taken mid-generation, and export must trace the text's K/V projections, not the values
        that generation cached (fast.uncache_cross_kv), and its fused q/k/v products are
        Linear layers, which the quantizer makes int8 (QuantizableSelfAttention)."""
        source = copy.deepcopy(self.float_unet).float()
        uncache_cross_kv(source)
        swap_layers(source, lambda _, layer: QuantizableSelfAttention.of(layer) if type(layer) is FusedSelfAttention
                    else None)
        return source

    def calibrated(self, latent_h: int, latent_w: int) -> bool:
        return (latent_h, latent_w) in self._records

    def add_calibration(self, records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Recorded UNet inputs (x, t, context), all of one latent size."""
        if not records:
            raise InputError("int8 calibration recorded no UNet calls")
        h, w = records[0][0].shape[-2:]
        self._records[(h, w)] = [tuple(a.detach().float() if a.is_floating_point() else a.detach() for a in r)
                                 for r in records]

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        key = (tuple(x.shape), tuple(t.shape), t.dtype, tuple(context.shape))
        graph = self._graphs.get(key)
        with torch.no_grad(), warnings.catch_warnings():  # no autograd: Inductor freezes weights only then
            if graph is None:
                # Inductor's int8 lowering in torch 2.13 copies tensors the way torch warns against.
                warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
                graph = self._graphs[key] = self._quantize(x, t, context)
            with torch.autocast("cpu", torch.bfloat16, enabled=self.activations == torch.bfloat16):
                # contiguous: a graph compiled ahead of time takes the strides it was made for
                return graph(x.float().contiguous(), t.contiguous(), context.float().contiguous()).to(x.dtype)

    def records_for(self, latent_size: tuple[int, int]) -> list[tuple]:
        """The calibration records of this latent size, at most MAX_OBSERVED_CALLS, spread evenly."""
        records = self._records.get(tuple(latent_size))
        if records is None:
            raise InputError(f"int8 UNet: not calibrated for latents of {tuple(latent_size)}; the pipeline "
                             "calibrates before the first image of each size (call the pipeline, not the UNet)")
        return records[::max(1, len(records) // MAX_OBSERVED_CALLS)][:MAX_OBSERVED_CALLS]

    def _quantize(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        calibration = [fit_record(record, i, x.shape[0], t, context.shape[1])
                       for i, record in enumerate(self.records_for(x.shape[-2:]))]
        example = (x.float().contiguous(), t.contiguous(), context.float().contiguous())
        if self._packages is None:
            log.info("int8: quantizing the UNet for inputs %s, context %s", tuple(x.shape), tuple(context.shape))
            return quantize_graph(self._pt2e, self.float32_source(), example, calibration)
        # Kept on disk, keyed by the float weights (the float32 source is made from them, and
        # only when building) and by the calibration inputs themselves: a later process
        # calibrates (the generations) but skips export, observers and compile.
        settings = {"freezing": True, "joint_custom_pre_pass": NoDtypeAssertions()}
        key = fingerprint(self.float_unet, example, settings, extra=f"int8 {self.activations} {torchao_version()} "
                                                                    f"calibration {tensors_digest(calibration)}")

        def export() -> torch.export.ExportedProgram:
            log.info("int8: quantizing the UNet for inputs %s, context %s", tuple(x.shape), tuple(context.shape))
            converted = quantized_graph(self._pt2e, self.float32_source(), example, calibration)
            compact_storages(converted)  # a throwaway graph: its views become copies for good
            program = torch.export.export(WithActivations(converted, self.activations), example, strict=False)
            drop_dtype_assertions(program.graph_module)  # export asserts them anew
            return program

        return self._packages.load_or_build("unet-int8", key, export, settings)

    def skipping_model(self, branch: int | None) -> "Int8SkippingUNet":
        """step_skipping.SkippingUNet in int8, per branch (step_skipping_for asks for it)."""
        models = self.__dict__.setdefault("_skipping", {})
        if branch not in models:
            models[branch] = Int8SkippingUNet(self, branch)
        return models[branch]


class QuantizableSelfAttention(FusedSelfAttention):
    """FusedSelfAttention (fast.py) whose fused q/k/v product is an nn.Linear. The x86
    quantizer makes int8 the products it finds as Linear layers; FusedSelfAttention's is
    F.linear on a tensor of its own, which stayed bfloat16: ten products a step, 42 of the
    int8 step's 649 ms at small-sd's shapes, 256x256 (tools/profile_unet.py)."""

    def _setup(self) -> None:
        super()._setup()
        self.to_qkv = nn.Linear(*reversed(self.qkv_weight.shape), bias=False, device="meta")  # in, out
        self.to_qkv.weight = nn.Parameter(self.qkv_weight, requires_grad=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(*self.to_qkv(x).chunk(3, dim=-1))


def quantized_graph(pt2e, source: nn.Module, example: tuple, calibration: list[tuple]) -> nn.Module:
    """PT2E on `source` traced at `example`: export, observe the calibration inputs, convert
    (the module docstring's steps 1-4)."""
    prepare_pt2e, convert_pt2e, quantizer = pt2e
    with torch.no_grad():
        with einops_cache_as_found():
            exported = torch.export.export(source, example, strict=False).module()
        observed = prepare_pt2e(exported, quantizer)
        for inputs in calibration:
            observed(*inputs)
        converted = convert_pt2e(observed)
    drop_dtype_assertions(converted)
    return converted


def quantize_graph(pt2e, source: nn.Module, example: tuple, calibration: list[tuple]):
    """`quantized_graph`, compiled in this process with freezing (step 5)."""
    compiled = torch.compile(quantized_graph(pt2e, source, example, calibration), fullgraph=True, dynamic=False)
    return WithInductorSettings(compiled, inductor_settings(example[0].device))


class WithActivations(nn.Module):
    """The int8 graph with its activations' dtype inside it, for export ahead of time: the
    package runs bfloat16 between the int8 kernels without an autocast around the call."""

    def __init__(self, graph: nn.Module, activations: torch.dtype):
        super().__init__()
        # Not named `graph`: the GraphModule that export makes of this has a `graph` of its own.
        self.quantized, self.activations = graph, activations

    def forward(self, *inputs):
        with torch.autocast("cpu", torch.bfloat16, enabled=self.activations == torch.bfloat16):
            return self.quantized(*inputs)


class NoDtypeAssertions(CustomGraphPass):
    """Inductor pass: `drop_dtype_assertions` on the graph AOTInductor traces again from the
    exported int8 program (that trace asserts each `.to()`'s input dtype anew)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        erase_dtype_assertions(graph)

    def uuid(self) -> str:
        return "minisd.int8.NoDtypeAssertions/1"

    def __repr__(self) -> str:  # in the package cache's key
        return self.uuid()


def torchao_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return "unknown"


class Int8SkippingUNet:
    """The UNet cut for step skipping (step_skipping.SkippingUNet, same call) in int8: one
    int8 graph per kind of step (full, recording, shallow, gated, gated shallow) and input
    shapes. Each kind is calibrated on the size's records, the inputs it needs derived from
    them by the float32 model: the deep features of a full step on the same inputs, and for
    gated steps the conditional half of the latents with the mean of each cross-attention's
    two halves (what a generation feeds these steps, taken at the recorded steps)."""

    def __init__(self, owner: Int8UNet, branch: int | None):
        self.owner, self.branch = owner, branch
        self._graphs: dict[tuple, object] = {}

    def __call__(self, sample: torch.Tensor, t, context=None, deep=None, cross=None, record: bool = False):
        t = torch.as_tensor(t, device=sample.device)
        tensors = [sample, context, deep, *(cross or ())]
        key = (context is None, deep is None, cross is None, record, t.dtype, tuple(t.shape),
               *(None if x is None else tuple(x.shape) for x in tensors))
        float32 = [None if x is None else x.float() for x in (sample, context, deep)]
        inputs = (float32[0], t, float32[1], float32[2], None if cross is None else tuple(c.float() for c in cross),
                  record)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            if key not in self._graphs:
                self._graphs[key] = self._quantize(inputs)
            with torch.autocast("cpu", torch.bfloat16, enabled=self.owner.activations == torch.bfloat16):
                noise, deep_out, recorded = self._graphs[key](*inputs)
        back = sample.dtype
        return noise.to(back), deep_out.to(back), None if recorded is None else tuple(r.to(back) for r in recorded)

    def _quantize(self, inputs: tuple):
        from .step_skipping import SkippingUNet  # step_skipping asks for this class: imported late, no cycle

        x, t, context, deep, cross, record = inputs
        log.info("int8: quantizing the step-skipping UNet for a %s step, inputs %s", "shallow" if deep is not None
                 else "full", tuple(x.shape))
        source = SkippingUNet(self.owner.float32_source(), self.branch)
        calibration = []
        with torch.no_grad():
            for i, rec in enumerate(self.owner.records_for(x.shape[-2:])):
                rec_x, rec_t, rec_context = rec
                rec_cross = None
                if cross is not None:  # a gated step: the conditional half, the frozen cross-attention
                    recorded = source(rec_x, rec_t, rec_context, record=True)[2]
                    rec_cross = tuple(sum(c.chunk(2)) / 2 for c in recorded)
                    rec_x, rec_context = rec_x.chunk(2)[1], None
                rec_deep = None if deep is None else source(rec_x, rec_t, rec_context, None, rec_cross)[1]
                rows = [(i + k) % rec_x.shape[0] for k in range(x.shape[0])]  # as fit_record takes them
                length = None if context is None else context.shape[1]
                rec_context = None if rec_context is None else fit_context(rec_context[rows], length)
                calibration.append((rec_x[rows], rec_t.reshape(-1)[0].to(t.dtype).expand(t.shape), rec_context,
                                    None if rec_deep is None else rec_deep[rows],
                                    None if rec_cross is None else tuple(c[rows] for c in rec_cross), record))
        return quantize_graph(self.owner._pt2e, source, inputs, calibration)


def fit_record(record: tuple, shift: int, batch: int, t: torch.Tensor, length: int) -> tuple:
    """A recorded (x, t, context) reshaped to another batch and context length: rows taken
    in turn (shifted per record, so a batch of one sees unconditional and conditional rows
    alike) and the context's 77-token chunks repeated, as a long A1111 prompt's are."""
    x, t_rec, context = record
    rows = [(shift + i) % x.shape[0] for i in range(batch)]
    return x[rows], t_rec.reshape(-1)[0].to(t.dtype).expand(t.shape), fit_context(context[rows], length)


def fit_context(context: torch.Tensor, length: int) -> torch.Tensor:
    """A context [B, T, D] brought to `length` tokens by repeating its 77-token chunks."""
    if context.shape[1] != length:
        context = context.repeat(1, math.ceil(length / context.shape[1]), 1)[:, :length]
    return context


def calibrate_int8(pipe, height: int, width: int) -> bool:
    """Before an int8 UNet's first image of a size: record its float twin's inputs over the
    calibration generations, run by `pipe` at that size. True if it ran (the pipeline's
    scheduler then holds the calibration's timesteps)."""
    unet = pipe.unet
    f = pipe.vae.downscale_factor
    if not isinstance(unet, Int8UNet) or unet.calibrated(height // f, width // f):
        return False
    prompts = unet.calibration_prompts
    log.info("int8: calibrating the UNet at %dx%d on %d generations of %d steps (once per size)",
             width, height, len(prompts), CALIBRATION_STEPS)
    records = []
    hook = unet.float_unet.register_forward_pre_hook(lambda _, inputs: records.append(inputs))
    pipe.unet = unet.float_unet
    try:
        for i, prompt in enumerate(prompts):
            pipe(prompt, height, width, num_inference_steps=CALIBRATION_STEPS, output_type="latent",
                 generator=torch.Generator().manual_seed(CALIBRATION_SEED + i))
    finally:
        pipe.unet = unet
        hook.remove()
    unet.add_calibration(records)
    return True


def drop_dtype_assertions(graph_module) -> None:
    """Export asserts the float32 dtype of some intermediate tensors; under bfloat16 autocast
    (int8-mixed-bf16) they hold bfloat16 and the assertion fails while compiling. Shapes and
    dtypes are Dynamo's guards anyway. Nested graphs too (export puts an autocast region in a
    graph of its own)."""
    for module in graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            erase_dtype_assertions(module.graph)
            module.recompile()


def erase_dtype_assertions(graph: torch.fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
