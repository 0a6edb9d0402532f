"""Prompts -> the UNet's text context, in the two syntaxes minisd reads.

    "plain"  (diffusers)       prompt -> [bos] + first 75 tokens + [eos] + pads -> CLIP -> [B, 77, D]
    "a1111"  (AUTOMATIC1111)   prompt -> weighted fragments -> chunks of 75 tokens (prompt_syntax.py)
                               -> each chunk [bos] + 75 + [eos] through CLIP on its own
                               -> hidden states x token weights, chunk mean restored
                               -> chunks side by side: [B, 77 * chunks, D]

The UNet's cross-attention takes a context of any length, so a long prompt is simply more
tokens to attend to. A1111's "Original" emphasis (modules/sd_emphasis.py in
https://github.com/AUTOMATIC1111/stable-diffusion-webui) scales a token's features, then
rescales the whole chunk so its mean is what it was: emphasis shifts attention between tokens
rather than making the whole prompt louder.
"""
from __future__ import annotations

import logging

import torch

from .clip import CLIPTextModel
from .errors import InputError
from .prompt_syntax import PromptChunk, chunk_prompt
from .runtime import check_finite
from .tokenizer import CLIPTokenizer, check_prompts

log = logging.getLogger("minisd")

PROMPT_SYNTAXES = ("plain", "a1111")


def check_prompt_syntax(syntax) -> str:
    if syntax not in PROMPT_SYNTAXES:
        raise InputError(f"prompt_syntax: must be one of {', '.join(map(repr, PROMPT_SYNTAXES))} "
                         f"(\"a1111\": AUTOMATIC1111's (word:1.2), [word], BREAK and prompts of any length), "
                         f"got {syntax!r:.80}")
    return syntax


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str],
                   syntax: str = "plain", clip_skip: int | None = None) -> torch.Tensor:
    """Prompts -> context [len(prompts), tokens, D] in the text encoder's dtype."""
    check_prompt_syntax(syntax)
    device = text_encoder.embeddings.token_embedding.weight.device
    if syntax == "plain":
        warn_truncated(tokenizer, prompts)
        context = text_encoder(tokenizer(prompts).to(device), clip_skip=clip_skip)
    else:
        context = _encode_weighted(tokenizer, text_encoder, prompts, device, clip_skip)
    check_finite(context, "the text encoder's output", "text_encoder weights hold NaN/inf")
    return context


def warn_truncated(tokenizer: CLIPTokenizer, prompts: list[str]) -> None:
    for cut in tokenizer.truncated_text(prompts):
        if cut:
            # A 10,000-character prompt should not flood the log: its start and its end.
            shown = cut if len(cut) <= 240 else f"{cut[:120]} [... {len(cut) - 240} characters ...] {cut[-120:]}"
            log.warning("The following part of your input was truncated because CLIP can only handle "
                        "sequences up to %d tokens: %r (prompt_syntax=\"a1111\" takes prompts of any length)",
                        tokenizer.model_max_length, shown)


def _encode_weighted(tokenizer, text_encoder, prompts, device, clip_skip) -> torch.Tensor:
    per_prompt = [chunk_prompt(p, tokenizer) for p in prompts]
    # Prompts of one batch share one context length: the shorter ones get empty chunks (only
    # bos and eos, weight 1) until all have as many as the longest, as A1111 pads a batch.
    count = max(len(chunks) for chunks in per_prompt)
    length = tokenizer.model_max_length
    empty = PromptChunk([tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (length - 1), [1.0] * length)
    chunks = [c for prompt_chunks in per_prompt for c in prompt_chunks + [empty] * (count - len(prompt_chunks))]
    ids = torch.tensor([c.ids for c in chunks], device=device)
    weights = torch.tensor([c.weights for c in chunks], device=device)
    z = text_encoder(ids, clip_skip=clip_skip)  # [B * count, 77, D]: every chunk on its own
    z = emphasize(z, weights)
    return z.reshape(len(prompts), count * length, z.shape[-1])  # chunks side by side


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: z [chunks, 77, D] times each token's weight [chunks, 77],
    then each chunk rescaled to the mean it had before. Computed in float32."""
    z32 = z.float()
    before = z32.mean(dim=(1, 2), keepdim=True)
    weighted = z32 * weights.float().unsqueeze(-1)
    after = weighted.mean(dim=(1, 2), keepdim=True)
    return (weighted * (before / after)).to(z.dtype)


def check_embeds(embeds, name: str, dim: int, batch: int | None = None) -> torch.Tensor:
    """A precomputed context as diffusers takes it: a float tensor [B, T, dim]."""
    if not isinstance(embeds, torch.Tensor):
        raise InputError(f"{name}: expected a float tensor [batch, tokens, {dim}], got {type(embeds).__name__}")
    if not embeds.is_floating_point() or embeds.dim() != 3 or embeds.shape[-1] != dim or 0 in embeds.shape:
        raise InputError(f"{name}: expected a float tensor [batch, tokens, {dim}] (the UNet's "
                         f"cross_attention_dim), got {embeds.dtype} of shape {tuple(embeds.shape)}")
    if batch is not None and embeds.shape[0] != batch:
        raise InputError(f"{name}: batch of {embeds.shape[0]}, expected {batch} (one per prompt)")
    if not torch.isfinite(embeds).all():
        raise InputError(f"{name}: holds NaN or infinity")
    return embeds


def check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, dim: int):
    """(prompts, negatives, prompt_embeds, negative_prompt_embeds): the texts as lists (or None)
    and the embeddings (or None), checked against each other as diffusers' check_inputs does;
    no negative prompt at all means "" for each prompt."""
    if (prompt is None) == (prompt_embeds is None):
        raise InputError("prompt: give the prompt as text or as prompt_embeds, not both" if prompt is not None
                         else "prompt: expected a string or a list of strings (or prompt_embeds), got None")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InputError("negative_prompt: give the negative prompt as text or as negative_prompt_embeds, not both")
    prompts = None if prompt is None else check_prompts(prompt, "prompt")
    if prompt_embeds is not None:
        prompt_embeds = check_embeds(prompt_embeds, "prompt_embeds", dim)
    batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    if negative_prompt_embeds is not None:
        negative_prompt_embeds = check_embeds(negative_prompt_embeds, "negative_prompt_embeds", dim, batch)
        return prompts, None, prompt_embeds, negative_prompt_embeds
    if negative_prompt is None:
        return prompts, [""] * batch, prompt_embeds, None
    negatives = check_prompts(negative_prompt, "negative_prompt")
    if len(negatives) == 1 and batch > 1 and isinstance(negative_prompt, str):
        negatives = negatives * batch
    if len(negatives) != batch:
        raise InputError(f"negative_prompt: {len(negatives)} negative prompt(s) for {batch} prompt(s)")
    return prompts, negatives, prompt_embeds, None
