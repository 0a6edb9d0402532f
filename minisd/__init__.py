"""minisd: Stable Diffusion v1 text-to-image and image-to-image, from scratch in plain PyTorch.

    from minisd import Pipeline
    pipe = Pipeline.from_pretrained("OFA-Sys/small-stable-diffusion-v0")   # a folder, or from the HF cache
    image = pipe("an apple, 4k", generator=torch.Generator().manual_seed(0)).images[0]
    again = pipe("an apple, oil painting", image=image, strength=0.6).images[0]

Each component loads on its own too: `load_tokenizer`, `load_text_encoder`, `load_unet`,
`load_vae`, `load_scheduler`, `load_safety_checker`, all `load_X(folder, device, dtype)`.
`SpeedLevers` picks the speed levers (fast.py) a Pipeline applies; `parse_prompt_attention`
is AUTOMATIC1111's prompt parser (prompt_syntax.py); docs/walkthrough.md is the reading order.
"""
__version__ = "0.1.0"

from .clip import load_text_encoder
from .dpm_solver import load_scheduler
from .errors import CheckpointError, InputError, MinisdError, ResourceError
from .fast import SpeedLevers
from .pipeline import Pipeline, PipelineOutput
from .prompt_syntax import parse_prompt_attention
from .safety import load_safety_checker
from .tokenizer import load_tokenizer
from .unet import load_unet
from .vae import load_vae

__all__ = ["Pipeline", "PipelineOutput", "SpeedLevers", "parse_prompt_attention", "load_tokenizer", "load_text_encoder", "load_unet", "load_vae",
           "load_scheduler", "load_safety_checker",
           "MinisdError", "CheckpointError", "InputError", "ResourceError", "__version__"]
