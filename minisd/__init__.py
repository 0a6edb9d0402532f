"""minisd: Stable Diffusion v1 text-to-image, from scratch in plain PyTorch.

    from minisd import Pipeline
    pipe = Pipeline.from_pretrained("path/to/small-stable-diffusion-v0")
    image = pipe("an apple, 4k", generator=torch.Generator().manual_seed(0)).images[0]

Each component loads on its own too: `load_tokenizer`, `load_text_encoder`, `load_unet`,
`load_vae`, `load_scheduler`, `load_safety_checker`, all `load_X(folder, device, dtype)`.
`SpeedLevers` picks the speed levers (fast.py) a Pipeline applies; docs/walkthrough.md is the
reading order.
"""
__version__ = "0.1.0"

from .clip import load_text_encoder
from .dpm_solver import load_scheduler
from .errors import CheckpointError, InputError, MinisdError, ResourceError
from .fast import SpeedLevers
from .pipeline import Pipeline, PipelineOutput
from .safety import load_safety_checker
from .tokenizer import load_tokenizer
from .unet import load_unet
from .vae import load_vae

__all__ = ["Pipeline", "PipelineOutput", "SpeedLevers", "load_tokenizer", "load_text_encoder", "load_unet", "load_vae",
           "load_scheduler", "load_safety_checker",
           "MinisdError", "CheckpointError", "InputError", "ResourceError", "__version__"]
