"""Property-based tests (hypothesis): the tokenizer on any text, the scheduler on any valid config
and step count, and command-line parsing on any argument list.

Scheduler finding: with Karras sigmas, diffusers 0.42.1 and minisd both round several sigmas to
the same timestep once there are 45 or more steps of 1000 (e.g. ..., 3, 1, 1, 0): timesteps are
then only non-increasing, while the sigmas, which are what the solver steps between, stay
strictly decreasing. The other spacings are strictly decreasing wherever minisd accepts the
step count; it refuses the counts where they would repeat a timestep or leave [0, T) (linspace
or leading at n = T, leading + steps_offset at n = T - 1), which in diffusers give NaN latents
or an IndexError.
"""
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisd.cli import ArgumentParser, UsageError, build_parser, parse_size
from minisd.config import SchedulerConfig
from minisd.dpm_solver import DPMSolverMultistep
from minisd.errors import InputError
from minisd.tokenizer import CLIPTokenizer

CLIP_VOCAB = Path(__file__).resolve().parents[1] / "weights" / "clip"
BOS, EOS, VOCAB_SIZE = 49406, 49407, 49408
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(CLIP_VOCAB)


# --- tokenizer --------------------------------------------------------------------------

def check_row(row: list[int], text: str | None = None) -> None:
    assert len(row) == 77 and row[0] == BOS and row[-1] == EOS  # the last is eos or padding (eos again)
    assert all(0 <= i < VOCAB_SIZE for i in row)
    if text is not None and "<|" not in text:  # the special tokens' text is not typed in
        end = row.index(EOS)  # bos, at most 75 tokens, eos, then only padding
        assert set(row[end:]) == {EOS} and BOS not in row[1:]


@QUICK
@given(text=st.text() | st.text(min_size=200, max_size=2000))  # the second: often over 75 tokens
def test_tokenizer_any_text_gives_77_ids_bos_first(tokenizer, text):
    ids = tokenizer(text)
    assert tuple(ids.shape) == (1, 77)
    check_row(ids[0].tolist(), text)
    if ids[0, 75] == EOS and "<|" not in text:  # at most 74 tokens: nothing was cut
        assert tokenizer.truncated_text(text) == [""]


@QUICK
@given(prompts=st.lists(st.text(max_size=400), min_size=1, max_size=4))
def test_tokenizer_batches(tokenizer, prompts):
    ids = tokenizer(prompts)
    assert tuple(ids.shape) == (len(prompts), 77)
    for i, row in enumerate(ids.tolist()):
        check_row(row, prompts[i])
        assert row == tokenizer(prompts[i])[0].tolist()  # a prompt's ids do not depend on its batch


@QUICK
@given(text=st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]))))
def test_tokenizer_lone_surrogates_are_a_clear_input_error(tokenizer, text):
    """Lone surrogates (what Python makes of bytes in argv that are not UTF-8) cannot be encoded:
    a clear InputError, never a crash in the tokenizers library."""
    has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    if has_surrogate:
        with pytest.raises(InputError, match=r"prompts\[0\]: not valid Unicode text"):
            tokenizer(text)
    else:
        check_row(tokenizer(text)[0].tolist(), text)


# --- scheduler --------------------------------------------------------------------------

@st.composite
def scheduler_configs(draw) -> dict:
    T = draw(st.integers(2, 1000))
    raw = {
        "num_train_timesteps": T,
        "beta_schedule": draw(st.sampled_from(["linear", "scaled_linear"])),
        "beta_start": draw(st.floats(1e-5, 0.01)),
        "beta_end": draw(st.floats(0.005, 0.05)),
        "solver_order": draw(st.sampled_from([1, 2, 3])),
        "solver_type": draw(st.sampled_from(["midpoint", "heun"])),
        "lower_order_final": draw(st.booleans()),
        "use_karras_sigmas": draw(st.booleans()),
        "final_sigmas_type": draw(st.sampled_from(["zero", "sigma_min"])),
        "timestep_spacing": draw(st.sampled_from(["linspace", "leading", "trailing"])),
        "steps_offset": draw(st.integers(0, 1)) if T > 2 else 0,
        "prediction_type": draw(st.sampled_from(["epsilon", "v_prediction"])),
    }
    if draw(st.booleans()):  # trained betas instead of a named schedule
        lo, hi = sorted(draw(st.lists(st.floats(1e-5, 0.05), min_size=2, max_size=2)))
        raw["trained_betas"] = np.linspace(lo, hi, T).tolist()
    return raw


def check_schedule(sched: DPMSolverMultistep, n: int) -> None:
    c, T = sched.config, sched.config.num_train_timesteps
    t = sched.timesteps.numpy()
    sigmas = sched.sigmas.numpy()
    assert len(t) == n and len(sigmas) == n + 1 and np.isfinite(sigmas).all()
    assert t.min() >= 0 and t.max() < T
    steps = np.diff(t)
    # Karras rounds several sigmas to one timestep at larger n (as diffusers does): see the docstring.
    assert (steps <= 0).all() if c.use_karras_sigmas else (steps < 0).all(), t
    assert (np.diff(sigmas[:-1]) < 0).all()  # every step but the last goes to a lower noise level
    # the last step goes to 0, or to sigma_min (a zero-length step when Karras already ended there)
    assert sigmas[-1] == 0 if c.final_sigmas_type == "zero" else sigmas[-1] <= sigmas[-2]


@settings(max_examples=300, deadline=None)
@given(raw=scheduler_configs(), data=st.data())
def test_scheduler_timesteps_decrease_in_range(raw, data):
    sched = DPMSolverMultistep(SchedulerConfig.from_dict(raw))
    T = sched.config.num_train_timesteps
    n = data.draw(st.one_of(st.integers(1, T), st.sampled_from([T, max(T - 1, 1)])), label="steps")
    try:
        sched.set_timesteps(n)
    except InputError as e:
        # refused only where the spacing cannot place n distinct timesteps in [0, T); then the
        # count the message suggests works
        assert not raw["use_karras_sigmas"] and n > T // 2, (n, T, e)
        most = int(re.search(r"use at most (\d+)$", str(e))[1])
        assert 1 <= most < n
        sched.set_timesteps(most)
        check_schedule(sched, most)
        return
    check_schedule(sched, n)


@settings(max_examples=40, deadline=None)
@given(n=st.just(1000) | st.integers(1, 1000))
def test_scheduler_step_counts_the_pipeline_accepts_for_sd(n):
    """SD v1's own schedule (small-sd's config): every count from 1 to 999 works; 1000 is refused
    with a message naming 999."""
    sched = DPMSolverMultistep(SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    if n == 1000:
        with pytest.raises(InputError, match="use at most 999"):
            sched.set_timesteps(n)
    else:
        sched.set_timesteps(n)
        check_schedule(sched, n)


# --- command-line parsing ---------------------------------------------------------------

OPTIONS = ["generate", "-o", "--output", "-n", "--negative", "--steps", "--guidance", "-s", "--seed", "--size",
           "-W", "--width", "-H", "--height", "-b", "--num-images", "-m", "--model", "--device", "--dtype",
           "--compile", "--int8", "--no-levers", "--no-safety-checker", "--init-image", "--strength", "--clip-skip",
           "--prompt-syntax", "--overwrite", "--quiet", "--debug", "--", "-", "--steps=3", "--size=64x64", "-b2", "-ncat", "-oout.png",
           "--neg", "--ov", "--no", "--d"]
VALUES = ["", "x", "a cat", "0", "-1", "25", "7.5", "nan", "inf", "1e3", "64x64", "512X768", "64x", "x64",
          "0x0", "-64x64", "out.png", "float16", "auto", "cpu", "cuda:1", "99999999999999999999999999", "a1111",
          "plain", "0.8", "in.png"]


def asks_for_help_or_version(token: str) -> bool:
    """-h, --help, --version and their abbreviations (--he, --vers, ...) print and exit, as they should."""
    return token.startswith("-") and token.lstrip("-")[:1] in ("h", "v")


argv_lists = st.lists(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES), st.text(max_size=12)),
                      max_size=10).filter(lambda argv: not any(map(asks_for_help_or_version, argv)))


@settings(max_examples=400, deadline=None)
@given(argv=argv_lists)
def test_cli_parsing_returns_a_namespace_or_a_usage_error(argv):
    """Never SystemExit, never a traceback: argparse's own error() exits, minisd's raises UsageError."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        assert str(e).startswith("minisd") and str(e).strip()
        return
    if args.command == "generate":
        assert isinstance(args.prompt, str) and isinstance(args.steps, int) and isinstance(args.guidance, float)
        assert args.size is None or (isinstance(args.size, tuple) and all(isinstance(v, int) for v in args.size))
        assert args.seed is None or isinstance(args.seed, int)
        assert args.strength is None or isinstance(args.strength, float)
        assert isinstance(args.clip_skip, int) and args.prompt_syntax in ("a1111", "plain")


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 10**6), h=st.integers(1, 10**6), sep=st.sampled_from(["x", "X"]),
       pad=st.sampled_from(["", " "]))
def test_parse_size_round_trips(w, h, sep, pad):
    text = f"{pad}{w}{sep}{h}{pad}"
    assert parse_size(text) == (w, h)
    assert build_parser().parse_args(["generate", "p", "--size", text]).size == (w, h)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=20))
def test_parse_size_accepts_only_two_integers(text):
    import argparse
    try:
        w, h = parse_size(text)
    except argparse.ArgumentTypeError as e:
        assert "expected WxH such as 512x512" in str(e)
        return
    parts = text.lower().split("x")
    assert len(parts) == 2 and (w, h) == (int(parts[0]), int(parts[1]))


def test_the_parser_never_exits_on_errors():
    assert isinstance(build_parser(), ArgumentParser)
    with pytest.raises(UsageError, match="invalid choice"):
        build_parser().parse_args(["frobnicate"])
