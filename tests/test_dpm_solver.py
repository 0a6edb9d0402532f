"""Parity of minisd's DPM-Solver++ with diffusers' DPMSolverMultistepScheduler (the reference),
on seeded random model outputs, over the options an SD v1 scheduler config can carry."""
import json
import logging

import numpy as np
import pytest
import torch

from minisd.config import SchedulerConfig
from minisd.dpm_solver import DPMSolverMultistep, load_scheduler
from minisd.errors import CheckpointError, InputError

diffusers = pytest.importorskip("diffusers")

# max|ours - ref| / max|ref| over each step's output, float32.
REL_TOL = 1e-6
STEP_COUNTS = (1, 2, 5, 10, 25, 50)

# OFA-Sys/small-stable-diffusion-v0 scheduler/scheduler_config.json, as published.
SMALL_SD = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.8.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "dynamic_thresholding_ratio": 0.995,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_epsilon": True,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False,
    "trained_betas": None,
}

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json.
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_TRAINED = (np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2).tolist()

# Each option value appears at least once; every config runs every step count.
CONFIGS = {
    "small-sd": SMALL_SD,
    "order1": SD | {"solver_order": 1},
    "order3": SD | {"solver_order": 3},
    "order3-no-lof": SD | {"solver_order": 3, "lower_order_final": False},
    "order3-heun-sigma-min": SD | {"solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
    "heun": SD | {"solver_type": "heun"},
    "heun-no-lof-sigma-min": SD | {"solver_type": "heun", "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    "no-lof": SD | {"lower_order_final": False},
    "sigma-min": SD | {"final_sigmas_type": "sigma_min"},
    "no-lof-sigma-min": SD | {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    "leading-offset1": SD | {"timestep_spacing": "leading", "steps_offset": 1},
    "leading": SD | {"timestep_spacing": "leading"},
    "trailing": SD | {"timestep_spacing": "trailing", "steps_offset": 1},
    "linspace-offset1": SD | {"timestep_spacing": "linspace", "steps_offset": 1},
    "karras": SD | {"use_karras_sigmas": True},
    "karras-order3": SD | {"use_karras_sigmas": True, "solver_order": 3},
    "karras-sigma-min": SD | {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    "v-prediction": SD | {"prediction_type": "v_prediction"},
    "v-trailing-heun": SD | {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "solver_type": "heun"},
    "linear-betas": {"beta_schedule": "linear"},
    "linear-order3-leading": {"beta_schedule": "linear", "solver_order": 3, "timestep_spacing": "leading"},
    "trained-betas": {"trained_betas": _TRAINED, "solver_order": 3},
}


def _reference(config: dict):
    return diffusers.DPMSolverMultistepScheduler.from_config(config)


def _ours(config: dict) -> DPMSolverMultistep:
    return DPMSolverMultistep(SchedulerConfig.from_dict(config))


def assert_parity(ref, ours, steps: int, dtype=torch.float32, tol=REL_TOL, seed=0) -> float:
    """Run both on the same random model outputs; return the worst relative error seen."""
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    assert ours.timesteps.dtype == torch.int64
    g = torch.Generator().manual_seed(seed)
    x_ref = x_ours = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    worst = 0.0
    for t in ref.timesteps:
        model_output = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
        x_ref = ref.step(model_output, t, x_ref).prev_sample
        x_ours = ours.step(model_output, t, x_ours)
        assert x_ours.dtype == x_ref.dtype
        nan = x_ref.isnan()
        assert torch.equal(x_ours.isnan(), nan), f"step at t={int(t)}: NaN where diffusers has none or v.v."
        if nan.all():
            continue
        diff = (x_ours.double() - x_ref.double())[~nan]
        err = (diff.abs().max() / x_ref.double()[~nan].abs().max()).item()
        assert err <= tol, f"step at t={int(t)}: relative error {err:.3g}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_diffusers(name):
    for steps in STEP_COUNTS:
        assert_parity(_reference(CONFIGS[name]), _ours(CONFIGS[name]), steps)


@pytest.mark.parametrize("steps", [14, 15])
def test_lower_order_final_boundary(steps):
    # lower_order_final lowers the order of the last two steps only below 15 steps.
    for name in ("order3", "order3-heun-sigma-min", "sigma-min"):
        assert_parity(_reference(CONFIGS[name]), _ours(CONFIGS[name]), steps)


@pytest.mark.parametrize("steps", [61, 103])
def test_trailing_spacing_never_leaves_the_training_range(steps):
    # diffusers' float arange gives n + 1 trailing timesteps, the last -1, for some n: a bug minisd
    # does not copy. It keeps the first n, which equal diffusers' timesteps.
    config = SD | {"timestep_spacing": "trailing"}
    ref, ours = _reference(config), _ours(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert len(ref.timesteps) == steps + 1 and ref.timesteps[-1] == -1  # the bug is still there
    assert torch.equal(ours.timesteps, ref.timesteps[:steps]) and ours.timesteps.min() >= 0


@pytest.mark.parametrize("extra", [{"solver_order": 3}, {"solver_type": "heun"}])
def test_karras_sigma_min_zero_length_step_is_a_no_op(extra):
    # Karras sigmas end at sigma_min and "sigma_min" appends it again: the last step has length 0.
    # diffusers' heun and third-order updates divide 0 by 0 there (NaN); minisd returns the sample,
    # as a step of length zero should, and matches diffusers on every step before.
    config = SD | {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"} | extra
    ref, ours = _reference(config), _ours(config)
    ref.set_timesteps(25)
    ours.set_timesteps(25)
    assert ours.sigmas[-1] == ours.sigmas[-2]
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 4, 8, 8, generator=g)
    for t in ref.timesteps:
        model_output = torch.randn(2, 4, 8, 8, generator=g)
        before = x_ours
        x_ref, x_ours = ref.step(model_output, t, x_ref).prev_sample, ours.step(model_output, t, x_ours)
        if t == ref.timesteps[-1]:
            assert x_ref.isnan().all() and torch.equal(x_ours, before)
        else:
            assert (x_ours - x_ref).abs().max() <= REL_TOL * x_ref.abs().max()


def test_start_mid_schedule():
    # img2img starts at a later timestep; both find its index on the first step.
    ref, ours = _reference(SMALL_SD | {"solver_order": 3}), _ours(SMALL_SD | {"solver_order": 3})
    ref.set_timesteps(25)
    ours.set_timesteps(25)
    g = torch.Generator().manual_seed(2)
    x_ref = x_ours = torch.randn(1, 4, 8, 8, generator=g)
    for t in ref.timesteps[10:]:
        model_output = torch.randn(1, 4, 8, 8, generator=g)
        x_ref, x_ours = ref.step(model_output, t, x_ref).prev_sample, ours.step(model_output, t, x_ours)
        assert (x_ours - x_ref).abs().max() <= REL_TOL * x_ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches(dtype):
    # diffusers computes x0 in the model's dtype and the update in float32; so do we, bit for bit.
    for config in (SMALL_SD, SD | {"solver_order": 3, "solver_type": "heun"}):
        assert_parity(_reference(config), _ours(config), 10, dtype=dtype, tol=0.0)


def test_small_sd_ten_steps():
    sched = _ours(SMALL_SD)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert sched.init_noise_sigma == 1.0
    x = torch.randn(1, 4, 8, 8)
    assert sched.scale_model_input(x, sched.timesteps[0]) is x


def _write(folder, config):
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def test_load_scheduler_small_sd(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="minisd"):
        sched = load_scheduler(_write(tmp_path, SMALL_SD))
    assert not [r for r in caplog.records if r.name == "minisd"]
    assert sched.config.prediction_type == "epsilon" and sched.config.class_name == "DPMSolverMultistepScheduler"
    assert_parity(_reference(SMALL_SD), sched, 10)


def test_load_scheduler_replaces_pndm(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="minisd"):
        sched = load_scheduler(_write(tmp_path, SD15_PNDM))
    warnings = [r for r in caplog.records if r.name == "minisd"]
    assert len(warnings) == 1 and "PNDMScheduler" in warnings[0].getMessage()
    assert sched.config.class_name == "PNDMScheduler"
    for steps in STEP_COUNTS:
        assert_parity(_reference(SD15_PNDM), sched, steps)


@pytest.mark.parametrize("option", [{"thresholding": True}, {"euler_at_final": True},
                                    {"algorithm_type": "sde-dpmsolver++"}, {"algorithm_type": "dpmsolver"}])
def test_load_scheduler_rejects_unsupported(tmp_path, option):
    with pytest.raises(CheckpointError, match=next(iter(option))):
        load_scheduler(_write(tmp_path, SMALL_SD | option))


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, None, True])
def test_bad_step_counts(steps):
    with pytest.raises(InputError, match=rf"num_inference_steps.*{steps!r}"):
        _ours(SMALL_SD).set_timesteps(steps)


def test_step_misuse():
    sched = _ours(SMALL_SD)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(InputError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(2)
    with pytest.raises(InputError, match="not in the schedule"):
        sched.step(x, 998, x)
    for t in sched.timesteps:
        x = sched.step(torch.randn_like(x), t, x)
    with pytest.raises(InputError, match="2 times"):
        sched.step(x, 0, x)


def test_inputs_not_modified():
    sched = _ours(SD | {"solver_order": 3})
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for t in sched.timesteps:
        model_output = torch.randn(1, 4, 8, 8, generator=g)
        x_copy, out_copy = x.clone(), model_output.clone()
        new = sched.step(model_output, t, x)
        assert torch.equal(x, x_copy) and torch.equal(model_output, out_copy)
        assert new.data_ptr() not in (x.data_ptr(), model_output.data_ptr())
        x = new


def test_a_config_built_by_hand_is_checked_too():
    with pytest.raises(CheckpointError, match="algorithm_type='sde-dpmsolver\\+\\+' is not supported"):
        DPMSolverMultistep(SchedulerConfig(algorithm_type="sde-dpmsolver++"))
    with pytest.raises(CheckpointError, match="10 trained_betas but num_train_timesteps=1000"):
        DPMSolverMultistep(SchedulerConfig(trained_betas=(0.01,) * 10))
