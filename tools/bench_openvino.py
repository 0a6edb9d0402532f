"""OpenVINO as tools/bench.py's peer: diffusers' own StableDiffusionPipeline, with its UNet and
VAE decoder compiled by OpenVINO for the CPU (modes openvino-bf16 and openvino-int8).

Everything but those two models stays as diffusers runs it in fp32: the tokenizer, the torch
text encoder, the scheduler loop (the folder's DPM-Solver++), CFG, the image post-processing.
So the prompt, seed, size, steps and CFG scale are those of every other mode, and bench's
CallTimer times the same UNet and VAE calls as in diffusers' modes.

How the pipeline is built (all of it counts as the mode's load time; the worker's notes split
it into convert, calibrate and compile seconds):
- diffusers loads the folder in fp32;
- the UNet (wrapped to return a plain tensor) and the VAE decode (post_quant_conv + decoder)
  are converted with `openvino.convert_model` from example inputs, then reshaped to the run's
  static shapes: latents [2, 4, size/8, size/8] (CFG's batch), a timestep, the text context
  [2, 77, 768]; the decode's latents [1, 4, size/8, size/8];
- int8 only: the UNet's inputs are recorded from the fp32 torch UNet's own calls while diffusers
  generates CALIBRATION_PROMPTS (one seed each, the run's size and steps, latents out: no
  decode), and `nncf.quantize` turns it into an int8 UNet: static scales, the inputs of every
  convolution and matrix product in int8 (weights symmetric per channel, activations
  asymmetric per tensor: model_type TRANSFORMER's MIXED preset, which also applies SmoothQuant
  to the linear layers and leaves additions and normalizations in float). The defaults, as
  issue 16 measured them. Keeping the time-embedding layers, conv_in and conv_out in bf16
  (nncf.IgnoredScope) halved the UNet's error at the last steps but moved the image's PSNR by
  0.5 dB (22.7 -> 23.2 dB vs diffusers fp32 on the random small-sd, torch fp32 VAE), so the
  defaults stay;
- both models are compiled for the CPU with bf16 inference precision (int8 ops stay int8), the
  latency hint and torch's thread count; torch's UNet and VAE modules are then dropped (the
  compiled models keep the fp32 weights they were converted from: the file's mapped pages).
The pipeline's `unet` and `vae` become OVUNet and OVVAE, small stand-ins that keep the config,
dtype and device diffusers reads and answer its calls as its own models would.

openvino and nncf are imported here only, by the openvino worker: a tool dependency, never a
minisd one.
"""
from __future__ import annotations

import gc
import time
import warnings

import numpy as np
import torch

INSTALL_HINT = "pip install -c requirements-pins.txt openvino nncf"
# Calibration: prompts unlike bench's PROMPT (the image measured is never one calibrated on).
CALIBRATION_PROMPTS = ("a red vintage car parked on a cobblestone street at dusk",
                       "a bowl of fruit on a wooden table, oil painting",
                       "portrait of an old fisherman with a grey beard, studio lighting",
                       "a snowy mountain lake surrounded by pine trees")
CALIBRATION_SEEDS = (101, 102, 103, 104)


def import_openvino(int8: bool):
    """openvino (and nncf for int8), or an error that says how to install them."""
    try:
        import openvino
        nncf = None
        if int8:
            import nncf
    except ImportError as e:
        raise RuntimeError(f"the openvino modes need OpenVINO and nncf ({e}): {INSTALL_HINT}") from None
    return openvino, nncf


def load_openvino_pipeline(pipeline_cls, folder, size: int, steps: int, guidance: float,
                           int8: bool, notes: list[str]):
    """diffusers' pipeline from `folder` with an OpenVINO UNet (bf16, or int8 + bf16) and VAE
    decoder (bf16), for `size`x`size` images; what it did goes into `notes`."""
    ov, nncf = import_openvino(int8)
    pipe = pipeline_cls.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    h = size // pipe.vae_scale_factor
    context = (2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    unet_inputs = (torch.randn(2, unet.config.in_channels, h, h), torch.tensor(999), torch.randn(*context))
    vae_inputs = (torch.randn(1, vae.config.latent_channels, h, h),)

    calibration, calibrate_s = None, 0.0
    if int8:  # recorded first, while the torch UNet is still whole
        start = time.perf_counter()
        calibration = record_unet_inputs(pipe, size, steps, guidance)
        calibrate_s += time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        ov_unet = convert(ov, UNetTensorOut(unet), unet_inputs)
        ov_vae = convert(ov, VAEDecodeOut(vae), vae_inputs)
    convert_s = time.perf_counter() - start
    # Drop torch's UNet and VAE modules. Their fp32 weights stay alive all the same: convert_model
    # shares torch's memory and the compiled models keep their source model's constants (about
    # 2.3 GB of the UNet's safetensors file, mapped; the same pages diffusers' own modes map).
    unet_config, vae_config = unet.config, vae.config
    del unet, vae, pipe.unet, pipe.vae
    gc.collect()

    if int8:
        start = time.perf_counter()
        ov_unet = nncf.quantize(ov_unet, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                subset_size=len(calibration))
        calibrate_s += time.perf_counter() - start
        del calibration

    start = time.perf_counter()
    core = ov.Core()
    compiled_unet = core.compile_model(ov_unet, "CPU", compile_config(ov))
    compiled_vae = core.compile_model(ov_vae, "CPU", compile_config(ov))
    compile_s = time.perf_counter() - start
    del ov_unet, ov_vae
    gc.collect()

    # Plain attribute writes: diffusers' pipeline __setattr__ would re-register the components.
    object.__setattr__(pipe, "unet", OVUNet(compiled_unet, unet_config))
    object.__setattr__(pipe, "vae", OVVAE(compiled_vae, vae_config))
    notes.append(f"OpenVINO {ov.get_version().split('-')[0]}, bf16 hint, static shapes, "
                 f"{torch.get_num_threads()} threads, torch fp32 text encoder")
    if int8:
        notes.append(f"UNet int8 by nncf.quantize (default preset, model_type TRANSFORMER) calibrated on the fp32 "
                     f"torch UNet's {len(CALIBRATION_PROMPTS) * steps} calls in {len(CALIBRATION_PROMPTS)} "
                     f"generations of other prompts at this size and step count")
    notes.append(f"convert {convert_s:.1f} s" + (f", calibrate {calibrate_s:.1f} s" if int8 else "")
                 + f", compile {compile_s:.1f} s (in load s)")
    return pipe


def compile_config(ov) -> dict:
    props, hints = ov.properties, ov.properties.hint
    return {hints.inference_precision: ov.Type.bf16,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: torch.get_num_threads()}


def convert(ov, module: torch.nn.Module, example: tuple):
    """`module` as an OpenVINO model with static input shapes (those of `example`)."""
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with warnings.catch_warnings():
        # Tracing warns at every shape check in diffusers' code; the shapes are static here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # convert_model(module) would trace it the same way, plus torch.jit.trace's check: three
        # more forward passes (seconds in fp32 at full size), and bench compares images anyway.
        decoder = TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
        model = ov.convert_model(decoder, example_input=example)
    model.reshape({port: ov.PartialShape(list(x.shape)) for port, x in zip(model.inputs, example)})
    return model


class UNetTensorOut(torch.nn.Module):
    """diffusers' UNet returning a plain tensor, as convert_model traces it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VAEDecodeOut(torch.nn.Module):
    """diffusers' VAE decode (post_quant_conv + decoder) returning a plain tensor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


class _Compiled(torch.nn.Module):
    """A compiled OpenVINO model behind the attributes diffusers reads off its models (config,
    dtype, device): an nn.Module, so the pipeline's device lookup sees it as a CPU model."""

    def __init__(self, compiled, config):
        super().__init__()
        self.config = config
        self._compiled = compiled  # kept alive with its request
        self._request = compiled.create_infer_request()
        self._types = [port.get_element_type().to_dtype() for port in compiled.inputs]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what goes in and out; inside it runs bf16 (or int8)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def run(self, *inputs) -> torch.Tensor:
        arrays = [np.asarray(x.detach().numpy() if torch.is_tensor(x) else x, dtype=t)
                  for x, t in zip(inputs, self._types)]
        self._request.infer(arrays, share_inputs=True)
        # A copy: the request's output buffer is reused by its next call.
        return torch.from_numpy(self._request.get_output_tensor(0).data.copy())


class OVUNet(_Compiled):
    """Stands in for diffusers' UNet2DConditionModel: `unet(sample, t, encoder_hidden_states=...)`."""

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict=True):
        if timestep_cond is not None or cross_attention_kwargs or added_cond_kwargs:
            raise NotImplementedError("OVUNet runs the plain text-to-image UNet call only")
        out = self.run(sample, timestep, encoder_hidden_states)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
            return UNet2DConditionOutput(sample=out)
        return (out,)


class OVVAE(_Compiled):
    """Stands in for diffusers' AutoencoderKL where text-to-image uses it: `vae.decode(z)`."""

    def decode(self, z, return_dict=True, generator=None):  # generator: unused by a KL decode
        image = self.run(z)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput
            return DecoderOutput(sample=image)
        return (image,)


class _Recorder:
    """Stands in for the torch UNet during calibration: runs it and keeps each call's inputs."""

    def __init__(self, unet):
        self.unet, self.inputs = unet, []

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        self.inputs.append([sample.numpy().copy(), np.array(timestep), encoder_hidden_states.numpy().copy()])
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    def __getattr__(self, name):
        return getattr(self.unet, name)


@torch.no_grad()
def record_unet_inputs(pipe, size: int, steps: int, guidance: float) -> list[list[np.ndarray]]:
    """The fp32 UNet's inputs (latents, timestep, context) at every step of CALIBRATION_PROMPTS."""
    unet, recorder = pipe.unet, _Recorder(pipe.unet)
    object.__setattr__(pipe, "unet", recorder)
    try:
        for prompt, seed in zip(CALIBRATION_PROMPTS, CALIBRATION_SEEDS):
            pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed), output_type="latent")
    finally:
        object.__setattr__(pipe, "unet", unet)
    return recorder.inputs
