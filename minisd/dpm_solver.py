"""DPM-Solver++ multistep sampler (Lu et al. 2022), numerically equal to diffusers 0.42.1's
`DPMSolverMultistepScheduler` for every option an SD v1 scheduler config can carry.

    >>> sched = DPMSolverMultistep(SchedulerConfig(beta_start=0.00085, beta_end=0.012,
    ...                                            beta_schedule="scaled_linear"))
    >>> sched.set_timesteps(10)
    >>> sched.timesteps.tolist()
    [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    >>> latents = torch.randn(1, 4, 64, 64) * sched.init_noise_sigma
    >>> for t in sched.timesteps:
    ...     latents = sched.step(unet(latents, t, text), t, latents)   # eps -> x_{t-1}

Notation (VP diffusion): x_t = alpha_t * x_0 + sigma_t * eps with alpha_t^2 + sigma_t^2 = 1, and
lambda_t = log(alpha_t / sigma_t) the half log-SNR. `self.sigmas` holds the *VE* noise level
sigma_t / alpha_t = sqrt((1 - alphas_cumprod) / alphas_cumprod), as diffusers does.

Reference: https://arxiv.org/abs/2211.01095 (DPM-Solver++), https://arxiv.org/abs/2206.00927
(DPM-Solver), and the file we match: diffusers/schedulers/scheduling_dpmsolver_multistep.py
(https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py).
"""
from __future__ import annotations

import logging
import numbers
from pathlib import Path

import numpy as np
import torch

from .checkpoint import read_config
from .config import SchedulerConfig
from .errors import InputError

logger = logging.getLogger("minisd")

# What minisd takes from another scheduler's config (PNDM, DDIM, LMS, Euler, ...): its noise
# schedule and model parameterisation. Everything else is DPM-Solver++'s default.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "predict_epsilon", "timestep_spacing", "steps_offset", "_class_name")


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VE noise level sigma = sigma_t / alpha_t -> (alpha_t, sigma_t) of the VP process."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR lambda = log(alpha_t / sigma_t), as diffusers computes it (inf at sigma 0)."""
    alpha_t, sigma_t = _alpha_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


class DPMSolverMultistep:
    """State: the schedule (`timesteps`, `sigmas`), the step index and the x0 predictions of the
    last two steps. `set_timesteps` resets it; then call `step` once per timestep, in order."""

    init_noise_sigma = 1.0  # VP process: x_T ~ N(0, I)

    def __init__(self, config: SchedulerConfig):
        config.validate(type(self).__name__)  # from_dict checked it too, but a config may be built by hand
        self.config = config
        T = config.num_train_timesteps
        # Betas: diffusers __init__ (scaled_linear is linear in sqrt(beta), LDM's schedule).
        if config.trained_betas is not None:
            betas = torch.tensor(config.trained_betas, dtype=torch.float32)
        elif config.beta_schedule == "linear":
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
        else:
            betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # VE noise level of each training timestep, ascending, float32 (numpy, like diffusers).
        self.train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None  # float32, CPU, one more than timesteps
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._x0_history: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        n, T, c = num_inference_steps, self.config.num_train_timesteps, self.config
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= T:
            raise InputError(f"num_inference_steps: must be an integer from 1 to {T}, got {n!r}")
        n = int(n)
        # Spacings of Lin et al. 2023, table 2 (https://arxiv.org/abs/2305.08891), as diffusers'
        # set_timesteps writes them. numpy, float64, so that rounding matches exactly.
        if c.use_karras_sigmas:
            # Karras et al. 2022 eq. 5, rho = 7 (https://arxiv.org/abs/2206.00364), between the
            # smallest and largest training sigma; timestep_spacing and steps_offset play no part.
            # diffusers: _convert_to_karras, then _sigma_to_t (rounded) for the timesteps.
            lo, hi = float(self.train_sigmas[0]) ** (1 / 7.0), float(self.train_sigmas[-1]) ** (1 / 7.0)
            sigmas = (hi + np.linspace(0, 1, n) * (lo - hi)) ** 7.0
            timesteps = self._sigma_to_t(sigmas).round()
        else:
            timesteps = self._spaced_timesteps(n)
            if not self._fits(timesteps):
                # linspace at n = T repeats a timestep, leading at n = T puts all of them at 0 and
                # leading + steps_offset can reach t = T: zero-length steps, after which the
                # multistep update divides 0 by 0 (diffusers: NaN latents or an IndexError).
                most = next(k for k in range(n - 1, 0, -1) if self._fits(self._spaced_timesteps(k)))
                raise InputError(f"num_inference_steps={n} is too many for timestep_spacing="
                                 f"{c.timestep_spacing!r} over {T} training timesteps (steps would "
                                 f"repeat a timestep or pass {T - 1}); use at most {most}")
            sigmas = np.interp(timesteps, np.arange(T), self.train_sigmas)
        # Karras sigmas already end at sigma_min, so "sigma_min" appends it twice: the last step
        # has length 0. diffusers' heun/third-order updates divide by it (NaN); minisd's step
        # returns the sample unchanged there, as diffusers' first-order and midpoint updates do.
        sigma_last = self.train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.append(sigmas, sigma_last).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)
        self._step_index = self._begin_index = None
        self._x0_history = []

    def set_begin_index(self, index: int) -> None:
        """Start the next `step` calls at `timesteps[index]` rather than at the first (img2img
        skips the noisiest steps). diffusers' name; reset by set_timesteps."""
        if self.timesteps is None or not 0 <= index < len(self.timesteps):
            raise InputError(f"set_begin_index({index}): outside the schedule of "
                             f"{0 if self.timesteps is None else len(self.timesteps)} steps")
        self._begin_index = index

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """x_t = alpha_t * x_0 + sigma_t * eps at the noise level of `timesteps[index]`: a clean
        sample noised to where step `index` starts (img2img's starting latents). Computed in the
        sample's dtype, as diffusers' add_noise does."""
        sigma = self.sigmas[index].to(device=original.device, dtype=original.dtype)
        alpha_t, sigma_t = _alpha_sigma(sigma)
        return alpha_t * original + sigma_t * noise

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """The n timesteps of `timestep_spacing`, highest first, as float64 integers."""
        c, T = self.config, self.config.num_train_timesteps
        if c.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        if c.timestep_spacing == "leading":
            # Quirk: diffusers' DPM-Solver divides by n + 1 (DDIM/PNDM divide by n), so 10 steps
            # are 900, 810, ..., 90 plus steps_offset.
            return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + c.steps_offset
        # trailing: T - k*T/n - 1 for k < n. diffusers' float `arange(T, 0, -T/n)` yields an
        # extra, out-of-range timestep -1 for some n (61, 103, ...); minisd keeps the first n,
        # equal to diffusers' wherever diffusers is in range.
        return (T - np.arange(n) * (T / n)).round() - 1

    def _fits(self, timesteps: np.ndarray) -> bool:
        """Strictly decreasing and inside the training range [0, T)."""
        return bool(np.all(np.diff(timesteps) < 0) and timesteps[0] < self.config.num_train_timesteps
                    and timesteps[-1] >= 0)

    def _sigma_to_t(self, sigmas: np.ndarray) -> np.ndarray:
        """Fractional training timestep of each sigma, by linear interpolation in log sigma
        (diffusers EulerDiscreteScheduler._sigma_to_t, vectorised)."""
        log_sigmas = np.log(self.train_sigmas)
        log_sigma = np.log(np.maximum(sigmas, 1e-10))
        dists = log_sigma - log_sigmas[:, None]  # (T, n)
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)

    @property
    def sampler_name(self) -> str:
        """The name other SD tools give this sampler in PNG metadata (`DPM++ 2M Karras`)."""
        return f"DPM++ {self.config.solver_order}M" + (" Karras" if self.config.use_karras_sigmas else "")

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """DPM-Solver feeds the UNet x_t as is; here for parity with schedulers that scale it."""
        return sample

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One solver step from `timestep` to the next one of the schedule; returns the new sample
        in the dtype of the x0 prediction (the promoted dtype of model_output and sample)."""
        if self.timesteps is None:
            raise InputError("DPMSolverMultistep.step called before set_timesteps")
        if self._step_index is None and self._begin_index is not None:
            self._step_index = self._begin_index
        elif self._step_index is None:  # first step: found by its timestep, so it may start mid-schedule
            hits = (self.timesteps.cpu() == int(timestep)).nonzero()
            if len(hits) == 0:
                raise InputError(f"timestep {int(timestep)} is not in the schedule {self.timesteps.tolist()}")
            self._step_index = int(hits[0])
        i, n = self._step_index, len(self.timesteps)
        if i >= n:
            raise InputError(f"step called more than the {n} times set_timesteps scheduled")

        x0 = self._predict_x0(model_output, sample, self.sigmas[i])
        if self.sigmas[i + 1] == self.sigmas[i]:  # zero-length step (see set_timesteps)
            self._x0_history = (self._x0_history + [x0])[-2:]
            self._step_index = i + 1
            return sample.to(x0.dtype)
        # Order: as high as the history allows; lower at the end "for numerical stability with
        # few steps" (diffusers step(): first order on the last step when it goes to sigma 0, or
        # when lower_order_final with < 15 steps; then also at most second order on the one before;
        # diffusers' euler_at_final is False here).
        few_steps = self.config.lower_order_final and n < 15
        order = min(self.config.solver_order, len(self._x0_history) + 1)
        if i == n - 1 and (few_steps or self.config.final_sigmas_type == "zero"):
            order = 1
        elif i == n - 2 and few_steps:
            order = min(order, 2)
        history = self._x0_history + [x0]  # oldest first
        # diffusers upcasts the sample (not the x0 history) to float32 for the update.
        prev = self._update(history[-order:], sample.to(torch.float32), i)
        self._x0_history = history[-2:]  # third order needs the two previous predictions
        self._step_index = i + 1
        return prev.to(x0.dtype)

    def _predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """DPM-Solver++ integrates the data prediction x0 (paper sec. 4; diffusers convert_model_output)."""
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if self.config.prediction_type == "epsilon":  # x_t = alpha x0 + sigma eps
            return (sample - sigma_t * model_output) / alpha_t
        # v_prediction: v = alpha eps - sigma x0  (Salimans & Ho 2022, https://arxiv.org/abs/2202.00512)
        return alpha_t * sample - sigma_t * model_output

    def _update(self, x0s: list[torch.Tensor], sample: torch.Tensor, i: int) -> torch.Tensor:
        """x at sigmas[i + 1] from x at sigmas[i] and the last len(x0s) x0 predictions (newest last).
        Expressions are diffusers' dpm_solver_first_order_update and multistep_dpm_solver_{second,
        third}_order_update term for term, so float rounding and dtype promotion match."""
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        sigma_s0 = _alpha_sigma(self.sigmas[i])[1]
        lambda_t, lambda_s0 = _lambda(self.sigmas[i + 1]), _lambda(self.sigmas[i])
        h = lambda_t - lambda_s0  # step length in half log-SNR
        m0 = x0s[-1]
        # First order, DPM-Solver++(1) = DDIM: arXiv 2211.01095 sec. 4, x0 held constant over [s, t].
        x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        if len(x0s) == 1:
            return x_t
        if len(x0s) == 2:
            # Second order multistep, DPM-Solver++(2M): arXiv 2211.01095 Algorithm 2 ("midpoint");
            # "heun" weights the same backward difference D1 by the exact integral's coefficient.
            m1 = x0s[-2]
            r0 = (lambda_s0 - _lambda(self.sigmas[i - 1])) / h
            D1 = (1.0 / r0) * (m0 - m1)
            if self.config.solver_type == "midpoint":
                return x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            return x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        # Third order multistep, DPM-Solver++(3M): the x0 form (2211.01095) of multistep
        # DPM-Solver-3 (2206.00927); D1, D2 are the first and second divided differences in lambda.
        m1, m2 = x0s[-2], x0s[-3]
        lambda_s1, lambda_s2 = _lambda(self.sigmas[i - 1]), _lambda(self.sigmas[i - 2])
        r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        return (x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
                - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)


def load_scheduler(pipeline_folder: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> DPMSolverMultistep:
    """DPM-Solver++ from `<pipeline_folder>/scheduler/scheduler_config.json`.

    A config of another class (SD v1-4/v1-5 ship PNDMScheduler) lends only its noise schedule
    (`_SCHEDULE_KEYS`); the rest is DPM-Solver++'s default, and a warning says so. `device` and
    `dtype` are accepted for a loader signature like the other components': the scheduler has no
    weights, `set_timesteps(n, device)` places the timesteps and `step` follows the sample's dtype.
    """
    raw = read_config(pipeline_folder, "scheduler")
    where = str(Path(pipeline_folder) / "scheduler" / "scheduler_config.json")
    name = raw.get("_class_name", "DPMSolverMultistepScheduler")
    if name != "DPMSolverMultistepScheduler":
        logger.warning("%s: %s replaced by DPMSolverMultistepScheduler (DPM-Solver++ with default options) "
                       "on the same noise schedule", where, name)
        raw = {k: v for k, v in raw.items() if k in _SCHEDULE_KEYS}
    return DPMSolverMultistep(SchedulerConfig.from_dict(raw, where))
