"""img2img: minisd's Pipeline called with `image=` (loading either fixture format) against
diffusers' StableDiffusionImg2ImgPipeline (loading the current-format folder, the same weights),
10 steps, fp32 CPU, the same seeds.

Compared, per case of CASES:
  - the 'np' images, within IMAGE_TOL (as tests/test_pipeline.py);
  - the 'latent' outputs, within LATENT_TOL.
diffusers is fed what minisd converts to itself: PIL images in RGB (RGBA, greyscale and palette
images go through `.convert("RGB")`). At sizes that are not multiples of 8 both generate at the
size rounded down; minisd then resizes its image back to the input's size (bicubic, antialiased),
so diffusers' 'pt' images are resized the same way before the comparison. The latents are compared
as they are.

Not compared with diffusers: several different images with num_images_per_prompt > 1 (minisd
pairs image i with prompt i's copies, diffusers repeats the image batch; checked against two
single-prompt diffusers runs instead), one prompt with k images (a minisd extension) and explicit
height/width (diffusers' img2img has none): those are checked for shape and consistency.
Nor guidance_rescale: diffusers' img2img swallows it in **kwargs and ignores it.
Also: strength and image errors (InputError naming the argument), determinism, inputs untouched.
"""
import contextlib
import re
import signal

import diffusers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minisd.errors import InputError
from minisd.pipeline import Pipeline

IMAGE_TOL = 2e-3   # max |minisd - diffusers| over 'np' images in [0, 1]
LATENT_TOL = 1e-4  # max |minisd - diffusers| over the final latents, per 10 units of their size.
# The VAE encoders round differently (memory layouts pick different convolution kernels: the speed
# levers', and diffusers' PIL images arrive channels-last), float rounding is relative, and this
# random fixture's latents reach ~60 at strength 1, where 10 steps make that ~1.4e-4.
STEPS = 10

# diffusers warns when it repeats one image for several prompts: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:You have passed .* initial images:FutureWarning")


# --- input images: a smooth gradient with a disc, deterministic -------------------------

def picture_array(width: int = 64, height: int = 64, variant: int = 0) -> np.ndarray:
    """[height, width, 3] float32 in [0, 1]; `variant` moves the disc and shifts the colours."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / max(width - 1, 1), y / max(height - 1, 1),
                      0.5 + 0.5 * np.sin((x + y) / 9 + variant)], axis=-1)
    cx, cy, radius = width * (0.35 + 0.3 * (variant % 2)), height * 0.5, min(width, height) / 4
    image[(x - cx) ** 2 + (y - cy) ** 2 < radius ** 2] = [0.9, 0.2 * (variant % 5), 0.1]
    return image


def picture(width: int = 64, height: int = 64, variant: int = 0, mode: str = "RGB") -> Image.Image:
    rgb = Image.fromarray((picture_array(width, height, variant) * 255).round().astype(np.uint8))
    if mode == "RGBA":  # an alpha gradient: RGB conversion drops it
        alpha = np.linspace(40, 255, width * height).reshape(height, width).astype(np.uint8)
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA")
    return rgb.convert(mode)


def picture_tensor(width: int = 64, height: int = 64, variant: int = 0) -> torch.Tensor:
    """[3, height, width] float32 in [0, 1]."""
    return torch.from_numpy(picture_array(width, height, variant)).permute(2, 0, 1).contiguous()


def generator(seed: int | list[int]) -> torch.Generator | list[torch.Generator]:
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)


def as_rgb(image):
    """What diffusers is fed: PIL images converted to RGB (minisd converts them itself)."""
    if isinstance(image, list):
        return [as_rgb(i) for i in image]
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def input_size(image) -> tuple[int, int]:
    """(height, width) of the (first) input image."""
    first = image[0] if isinstance(image, list) else image
    if isinstance(first, np.ndarray):  # [H, W, 3]
        return tuple(first.shape[-3:-1])
    return (first.height, first.width) if isinstance(first, Image.Image) else tuple(first.shape[-2:])


# --- the two pipelines ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny_current):
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_current, safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["current", "legacy"])
def ours(request, make_tiny):
    return Pipeline.from_pretrained(make_tiny(request.param), safety_checker=None)


def run_ours(ours, case: dict, output_type: str):
    args = {k: v for k, v in case.items() if k != "seed"}
    return ours(**args, num_inference_steps=STEPS, generator=generator(case["seed"]),
                output_type=output_type).images


def run_reference(reference, case: dict, output_type: str):
    """diffusers' 'latent' output as is, or its images as 'np', resized to the input's size
    the way minisd does (a no-op at sizes that are multiples of 8)."""
    args = {k: v for k, v in case.items() if k not in ("seed", "image")}
    run = dict(args, image=as_rgb(case["image"]), num_inference_steps=STEPS, generator=generator(case["seed"]))
    if output_type == "latent":
        return reference(**run, output_type="latent").images
    images = reference(**run, output_type="pt").images
    if tuple(images.shape[-2:]) != input_size(case["image"]):
        images = F.interpolate(images, size=input_size(case["image"]), mode="bicubic", antialias=True).clamp(0, 1)
    return images.permute(0, 2, 3, 1).numpy()


CASES = {
    "strength 0.3": dict(prompt="a red cube", image=picture(), strength=0.3, seed=7),
    "strength 0.55": dict(prompt="a red cube", image=picture(), strength=0.55, seed=7),
    "strength 0.8": dict(prompt="a red cube", image=picture(), strength=0.8, seed=7),
    "strength 1.0": dict(prompt="a red cube", image=picture(), strength=1.0, seed=7),
    "strength 1 (an int)": dict(prompt="a red cube", image=picture(), strength=1, seed=7),
    "two prompts, one image each": dict(prompt=["a red cube", "a blue sphere on grass"],
                                        image=[picture(variant=0), picture(variant=1)],
                                        negative_prompt=["blurry", "low quality, text"], strength=0.7, seed=3),
    "two prompts, a tensor batch of two": dict(prompt=["a red cube", "a blue sphere"], strength=0.6, seed=4,
                                               image=torch.stack([picture_tensor(variant=v) for v in (2, 3)])),
    "one image for two prompts": dict(prompt=["a house", "a tree"], image=picture(), strength=0.6, seed=5),
    "a one-image list for two prompts": dict(prompt=["a house", "a tree"], image=[picture()], strength=0.6, seed=5),
    "one image, two prompts, two each, one generator": dict(prompt=["a house", "a tree"], image=picture(),
                                                            num_images_per_prompt=2, strength=0.6, seed=5),
    "one image, two prompts, two each, four generators": dict(prompt=["a house", "a tree"], image=picture(),
                                                              num_images_per_prompt=2, strength=0.6,
                                                              seed=[10, 11, 12, 13]),
    "two prompts, a generator each": dict(prompt=["a house", "a tree"], image=[picture(variant=0), picture(variant=1)],
                                          strength=0.8, seed=[20, 21]),
    "no guidance": dict(prompt="a dog", image=picture(), guidance_scale=1.0, strength=0.8, seed=7),
    "non-square 80x48": dict(prompt="a wide landscape", image=picture(80, 48), strength=0.75, seed=8),
    "odd size PIL 70x45": dict(prompt="a wide landscape", image=picture(70, 45), strength=0.75, seed=8),
    "odd size tensor 3x50x66": dict(prompt="a wide landscape", image=picture_tensor(66, 50), strength=0.75, seed=8),
    "odd size tensor batch 1x3x50x66": dict(prompt="a cat", image=picture_tensor(66, 50)[None], strength=0.5, seed=9),
    "numpy float array at odd size 70x45": dict(prompt="a cat", image=picture_array(70, 45), strength=0.6, seed=2),
    "RGBA": dict(prompt="a cat", image=picture(mode="RGBA"), strength=0.6, seed=1),
    "RGBA at odd size 70x45": dict(prompt="a cat", image=picture(70, 45, mode="RGBA"), strength=0.6, seed=1),
    "greyscale": dict(prompt="a cat", image=picture(mode="L"), strength=0.6, seed=1),
    "palette": dict(prompt="a cat", image=picture(variant=1, mode="P"), strength=0.6, seed=1),
}


def test_reference_scheduler_is_dpm_solver(reference):
    assert type(reference.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert reference.vae_scale_factor == 8


@pytest.mark.parametrize("case", list(CASES))
def test_img2img_image_parity(ours, reference, case):
    expected = run_reference(reference, CASES[case], "np")
    got = run_ours(ours, CASES[case], "np")
    assert got.shape == expected.shape
    assert expected.std() > 1e-3  # not a blank image
    diff = np.abs(got - expected).max()
    assert diff <= IMAGE_TOL, f"max |minisd - diffusers| = {diff:.3g} on the 'np' images"


@pytest.mark.parametrize("case", list(CASES))
def test_img2img_latent_parity(ours, reference, case):
    expected = run_reference(reference, CASES[case], "latent")
    got = run_ours(ours, CASES[case], "latent")
    assert tuple(got.shape) == tuple(expected.shape)
    diff, size = (got - expected).abs().max().item(), expected.abs().max().item()
    tolerance = LATENT_TOL * max(1.0, size / 10)
    assert diff <= tolerance, f"max |minisd - diffusers| = {diff:.3g} on latents up to {size:.3g}"


def test_different_images_with_copies_pair_each_image_with_its_prompt(ours, reference):
    """prompts [p0, p1], images [i0, i1], two per prompt, generators g0..g3: minisd's images are
    (p0,i0,g0), (p0,i0,g1), (p1,i1,g2), (p1,i1,g3). With one generator per image nothing else
    couples the batch, so they equal two single-prompt diffusers runs."""
    images, seeds = [picture(variant=0), picture(variant=1)], [30, 31, 32, 33]
    got = run_ours(ours, dict(prompt=["a house", "a tree"], image=images, num_images_per_prompt=2,
                              strength=0.7, seed=seeds), "np")
    expected = np.concatenate([
        run_reference(reference, dict(prompt=p, image=i, num_images_per_prompt=2, strength=0.7, seed=s), "np")
        for p, i, s in (("a house", images[0], seeds[:2]), ("a tree", images[1], seeds[2:]))])
    assert got.shape == expected.shape == (4, 64, 64, 3)
    diff = np.abs(got - expected).max()
    assert diff <= IMAGE_TOL, f"max |minisd - diffusers| = {diff:.3g} on the 'np' images"


def test_different_images_with_copies_one_generator(ours, reference):
    """As above with one generator. Both draw the two images' posterior samples, then four noises,
    so minisd's (p0,i0,noise0) and (p1,i1,noise3) equal diffusers' images 0 and 3; its images 1
    and 2 pair the noise with i0 and i1 where diffusers' [i0, i1, i0, i1] has i1 and i0."""
    case = dict(prompt=["a house", "a tree"], image=[picture(variant=0), picture(variant=1)],
                num_images_per_prompt=2, strength=0.7, seed=40)
    got, expected = run_ours(ours, case, "np"), run_reference(reference, case, "np")
    assert got.shape == expected.shape == (4, 64, 64, 3)
    diff = np.abs(got[[0, 3]] - expected[[0, 3]]).max()
    assert diff <= IMAGE_TOL, f"max |minisd - diffusers| = {diff:.3g} on images 0 and 3"
    assert np.abs(got[[1, 2]] - expected[[1, 2]]).max() > 1e-2  # the intended pairing


# --- sizes, output types, batches without a diffusers equivalent ----------------------------

@pytest.mark.parametrize("image, size", [
    (picture(), (64, 64)), (picture(70, 45), (45, 70)), (picture_tensor(66, 50), (50, 66))],
    ids=["64x64", "PIL 70x45", "tensor 3x50x66"])
def test_output_types_agree(ours, image, size):
    def run(output_type):
        return ours("a cat", image=image, strength=0.6, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(0), output_type=output_type).images
    pil, array, pt, latent = run("pil"), run("np"), run("pt"), run("latent")
    height, width = size
    assert pil[0].size == (width, height) and pil[0].mode == "RGB"
    assert array.shape == (1, height, width, 3) and array.dtype == np.float32
    assert pt.shape == (1, 3, height, width) and 0 <= pt.min() and pt.max() <= 1
    assert tuple(latent.shape) == (1, 4, height // 8, width // 8)
    assert np.array_equal(pt.permute(0, 2, 3, 1).numpy(), array)
    assert np.array_equal(np.asarray(pil[0]), (array[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("image, height, width", [
    (picture(70, 45), 32, 48), (picture(), 48, 80), (picture_tensor(66, 50), 64, 64)],
    ids=["PIL 70x45 to 48x32", "PIL 64x64 to 80x48", "tensor 3x50x66 to 64x64"])
def test_height_and_width_set_the_output_size(ours, image, height, width):
    run = dict(image=image, height=height, width=width, strength=0.6, num_inference_steps=2)
    pil = ours("a cat", **run, output_type="pil").images
    latent = ours("a cat", **run, output_type="latent").images
    assert pil[0].size == (width, height)
    assert tuple(latent.shape) == (1, 4, height // 8, width // 8)


def test_one_prompt_with_several_images(ours):
    """One prompt, k images: k images, the same as the prompt repeated k times."""
    images = [picture(variant=v) for v in range(3)]
    run = dict(image=images, strength=0.6, num_inference_steps=3, output_type="np")
    one = ours("a cat", **run, generator=torch.Generator().manual_seed(2)).images
    repeated = ours(["a cat"] * 3, **run, generator=torch.Generator().manual_seed(2)).images
    assert one.shape == (3, 64, 64, 3)
    assert np.abs(one - repeated).max() <= 1e-6
    assert np.abs(one[0] - one[1]).max() > 1e-2  # different images give different results
    two_each = ours("a cat", **dict(run, output_type="latent"), num_images_per_prompt=2).images
    assert two_each.shape[0] == 6


@pytest.mark.parametrize("image", [
    picture(), picture(70, 45, mode="RGBA"), [picture(variant=0), picture(variant=1)], picture_tensor(66, 50),
    torch.stack([picture_tensor(variant=0), picture_tensor(variant=1)])],
    ids=["PIL", "PIL RGBA odd size", "list of PIL", "tensor odd size", "tensor batch"])
def test_same_seed_same_images_and_input_untouched(ours, image):
    before = [i.copy() for i in image] if isinstance(image, list) else \
        image.copy() if isinstance(image, Image.Image) else image.clone()
    prompt = ["a cat", "a dog"] if len(input_batch(image)) == 2 else "a cat"

    def run():
        return ours(prompt, image=image, strength=0.7, num_inference_steps=4,
                    generator=torch.Generator().manual_seed(11), output_type="np").images
    assert np.array_equal(run(), run())
    for old, new in zip(input_batch(before), input_batch(image)):
        if isinstance(new, Image.Image):
            assert (new.mode, new.size, new.tobytes()) == (old.mode, old.size, old.tobytes())
        else:
            assert new.dtype == old.dtype and torch.equal(new, old)


def input_batch(image) -> list:
    if isinstance(image, list):
        return image
    return list(image) if isinstance(image, torch.Tensor) and image.ndim == 4 else [image]


# --- errors ---------------------------------------------------------------------------------

STRENGTH_RANGE_WORDS = ("(0, 1]", "0 < strength <= 1", "between 0 and 1")


@pytest.mark.parametrize("strength", [0, 0.0, -0.2, 1.0001, 2, float("nan"), float("inf"), -float("inf"),
                                      "0.5", True, False, [0.5]],
                         ids=repr)
def test_strength_out_of_range_or_not_a_number(ours, strength):
    with pytest.raises(InputError) as caught:
        ours("a cat", image=picture(), strength=strength, num_inference_steps=STEPS, output_type="latent")
    message = str(caught.value)
    assert caught.type is InputError and message.startswith("strength"), message
    assert any(words in message for words in STRENGTH_RANGE_WORDS), f"no valid range in: {message}"


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail, rather than hang the suite, when the body runs longer than `seconds` (Unix)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("strength, steps, smallest", [
    (0.05, 10, "0.1"), (0.09, 10, "0.1"), (0.2, 4, "0.25"), (1e-4, 10, "0.1"), (1e-20, 10, "0.1"),
    (1e-300, 10, "0.1"), (5e-324, 10, "0.1")])
def test_strength_too_small_for_one_step(ours, strength, steps, smallest):
    with time_limit(10), pytest.raises(InputError) as caught:
        ours("a cat", image=picture(), strength=strength, num_inference_steps=steps, output_type="latent")
    message = str(caught.value)
    assert caught.type is InputError and message.startswith("strength"), message
    assert smallest in message, f"the smallest strength that works ({smallest}) is not named in: {message}"
    # a step count it suggests must be one that works: num_inference_steps is at most 1000
    assert all(int(n) <= 1000 for n in re.findall(r"(\d+) steps", message)), message


def test_strength_smallest_that_works(ours):
    ours("a cat", image=picture(), strength=0.1, num_inference_steps=10, output_type="latent")


def test_strength_without_image(ours):
    with pytest.raises(InputError, match="strength") as caught:
        ours("a cat", strength=0.5, num_inference_steps=2, output_type="latent")
    assert caught.type is InputError


def test_latents_with_image(ours):
    with pytest.raises(InputError, match="latents") as caught:
        ours("a cat", image=picture(), latents=torch.randn(1, 4, 8, 8), num_inference_steps=2, output_type="latent")
    assert caught.type is InputError


def with_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[1, 10, 20] = float("nan")
    return tensor


BAD_IMAGES = {
    "a string": dict(image="cat.png"),
    "an int": dict(image=3),
    "a dict": dict(image={"image": picture()}),
    "tensor with 1 channel": dict(image=picture_tensor()[:1][None]),
    "tensor with 4 channels": dict(image=torch.cat([picture_tensor(), picture_tensor()[:1]])[None]),
    "3-D tensor with 4 channels": dict(image=torch.cat([picture_tensor(), picture_tensor()[:1]])),
    "tensor above 1": dict(image=picture_tensor() * 2),
    "tensor in [-1, 1]": dict(image=picture_tensor() * 2 - 1),
    "tensor with NaN": dict(image=with_nan(picture_tensor())),
    "tensor with inf": dict(image=with_nan(picture_tensor()).nan_to_num(nan=float("inf"))),
    "uint8 tensor": dict(image=(picture_tensor() * 255).to(torch.uint8)),
    "int64 tensor": dict(image=picture_tensor().round().long()),
    "2-D tensor": dict(image=picture_tensor()[0]),
    "5-D tensor": dict(image=picture_tensor()[None, None]),
    "empty list": dict(image=[]),
    "list mixing PIL and tensor": dict(image=[picture(), picture_tensor()]),
    "list holding a string": dict(image=[picture(), "cat.png"]),
    "3 images for 2 prompts": dict(prompt=["a", "b"], image=[picture(variant=v) for v in range(3)]),
    "tensor batch of 3 for 2 prompts": dict(prompt=["a", "b"], image=picture_tensor()[None].repeat(3, 1, 1, 1)),
    "PIL 7 pixels wide": dict(image=picture(7, 64)),
    "PIL 5 pixels high": dict(image=picture(64, 5)),
    "tensor 7 pixels wide": dict(image=picture_tensor(7, 64)),
    "empty tensor": dict(image=torch.zeros(1, 3, 0, 64)),
    "uint8 numpy array": dict(image=(picture_array() * 255).astype(np.uint8)),
    "2-D numpy array": dict(image=picture_array()[..., 0]),
    "empty 3-D tensor": dict(image=torch.zeros(3, 64, 0)),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image(ours, case):
    args = {"prompt": "a cat", "strength": 0.5, **BAD_IMAGES[case]}
    with pytest.raises(InputError, match="image") as caught:
        ours(**args, num_inference_steps=2, output_type="latent")
    assert caught.type is InputError
