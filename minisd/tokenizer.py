"""CLIP's byte-level BPE tokenizer: prompt text -> the [B, 77] token ids the text encoder reads.

Built on the `tokenizers` library with the pipeline transformers 5's CLIPTokenizer builds
(https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/tokenization_clip.py),
so the ids match it token for token (tests/test_tokenizer.py checks hundreds of prompts):

  1. normalize: NFC, every run of whitespace -> " ", lower-case. CLIP's vocabulary has no
     upper-case tokens (OpenAI's tokenizer lower-cases too), so "Astronaut" == "astronaut".
  2. split into words with CLIP's regex: runs of letters, single digits, runs of punctuation,
     the contractions 's 't 're 've 'm 'll 'd. Whitespace is dropped, never a token.
  3. byte-level: every UTF-8 byte becomes one printable character (GPT-2's trick), so no
     text is ever unknown; emoji and CJK become several byte tokens.
  4. BPE inside each word. The last piece of a word carries the suffix "</w>", so "photo</w>"
     (a whole word) and "photo" (the start of "photographer") are different tokens.
  5. frame: <|startoftext|>, the first 75 tokens, <|endoftext|>, then pad to 77. This is what
     diffusers gets from `tokenizer(p, padding="max_length", max_length=77, truncation=True)`.

Worked example (SD v1 vocabulary, weights/clip):

    >>> tok = CLIPTokenizer.from_folder("weights/clip")
    >>> tok("a photo of an Astronaut")[0, :8].tolist()
    [49406, 320, 1125, 539, 550, 18376, 49407, 49407]

    49406 <|startoftext|>, 320 "a</w>", 1125 "photo</w>", 539 "of</w>", 550 "an</w>",
    18376 "astronaut</w>", 49407 <|endoftext|>, then 49407 again as padding: SD v1's pad token
    *is* <|endoftext|> (SD 2 pads with "!", id 0). The text encoder is causal, so pads never
    change the features of the real tokens, but they do get features of their own, which the
    UNet attends to: the pad id is part of the model and is read from the checkpoint.
"""
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .config import read_json
from .errors import CheckpointError, InputError

MAX_LENGTH = 77  # CLIP's text encoder has 77 positions
# transformers 5's split regex; unlike its older slow->fast converter it keeps the two special
# tokens whole, which matters for "<|ENDOFTEXT|>" typed in upper case (then just text, see below)
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CLIP_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                 "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: a '#version' header, then one merge 'left right' per line, highest priority first."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; re-download it") from e
    merges = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if line.startswith("#version") or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{path} line {n} is not a merge 'left right': {line[:80]!r}; re-download it")
        merges.append((parts[0], parts[1]))
    return merges


def _check_bpe(vocab: dict, merges: list, vocab_path: Path, merges_path: Path) -> None:
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and type(v) is int for k, v in vocab.items()):
        raise CheckpointError(f"the vocabulary in {vocab_path} should map token strings to int ids; re-download it")
    for n, (a, b) in enumerate(merges, 1):  # tokenizers panics (not raises) on some of these
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise CheckpointError(f"merge {n} ({a!r} {b!r}) in {merges_path} uses a token missing from the vocabulary")


def _added_token(value, source: Path) -> AddedToken:
    """A special token as transformers stores it: a bare string, or a dict with content and flags.
    `normalized=True` means it is matched after lower-casing, so "<|STARTOFTEXT|>" matches too;
    a bare string becomes normalized=False: matched in the raw prompt, case-sensitively."""
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=value.get("special", True), **flags)
    raise CheckpointError(f"{source} holds a special token that is neither a string nor a token dict: {value!r}")


def _special_tokens(folder: Path, config: dict, tokenizer_json: dict) -> tuple[dict, list[AddedToken]]:
    """Which strings are bos/eos/unk/pad, and the added tokens to match whole in prompts, the way
    transformers 5's `from_pretrained` decides (tokenization_utils_base.py, TokenizersBackend.__init__)."""
    named = {**CLIP_DEFAULTS, **{k: config[k] for k in SPECIAL_KEYS if config.get(k) is not None}}
    if "added_tokens_decoder" in config:  # newer saves list every added token, with flags, here
        found, source = config["added_tokens_decoder"], folder / "tokenizer_config.json"
        found = [found[i] for i in sorted(found, key=int)] if isinstance(found, dict) else None
    else:  # legacy: special_tokens_map.json overrides; tokenizer.json's added_tokens keep their flags
        stm = read_json(folder / "special_tokens_map.json", optional=True)
        named.update({k: stm[k] for k in SPECIAL_KEYS if stm.get(k) is not None})
        found, source = tokenizer_json.get("added_tokens", []), folder / "tokenizer.json"
        ok = isinstance(found, list) and all(isinstance(t, dict) for t in found)
        found = sorted(found, key=lambda t: t.get("id", 0)) if ok else None
    if found is None:
        raise CheckpointError(f"the added tokens in {source} are not a list of token dicts; re-download it")
    explicit = [_added_token(t, source) for t in found]
    named = {k: _added_token(named[k], folder) for k in SPECIAL_KEYS if k in named}
    # then each named token not already listed is appended; a later entry with the same text
    # replaces an earlier one. Hence SD v1's quirk: eos is normalized=True in special_tokens_map.json
    # but pad is the bare string "<|endoftext|>", so "<|endoftext|>" ends up case-sensitive while
    # "<|startoftext|>" is not. And SD 2's pad "!" becomes an added token: "!!!" -> three "!" tokens.
    queue = list(explicit)
    for tok in named.values():
        if tok.content not in {t.content for t in explicit} and tok not in queue:
            queue.append(tok)
    return {k: t.content for k, t in named.items()}, queue


def _read_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict]:
    """vocab, merges and the whole tokenizer.json ({} if absent) of a tokenizer folder.
    tokenizer.json wins when present, as in transformers."""
    path = folder / "tokenizer.json"
    if path.is_file():
        tokenizer_json = read_json(path)
        model = tokenizer_json.get("model")
        if not (isinstance(model, dict) and model.get("type", "BPE") == "BPE" and isinstance(model.get("merges"), list)):
            raise CheckpointError(f"{path} does not hold a BPE model with vocab and merges; is it a CLIP tokenizer?")
        # merges are "a b" strings in older saves, ["a", "b"] pairs in newer ones
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        if not all(len(m) == 2 and all(isinstance(s, str) for s in m) for m in merges):
            raise CheckpointError(f"{path} has a merge that is not a pair of strings; re-download it")
        vocab, paths = model.get("vocab"), (path, path)
    else:
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"tokenizer folder {folder} has no tokenizer.json and lacks {' and '.join(missing)}")
        paths, tokenizer_json = (folder / "vocab.json", folder / "merges.txt"), {}
        vocab, merges = read_json(paths[0]), _read_merges(paths[1])
    _check_bpe(vocab, merges, *paths)
    return vocab, merges, tokenizer_json


class CLIPTokenizer:
    """Prompts -> LongTensor [B, model_max_length]. Build it with `from_folder`."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], special: dict[str, str],
                 added: list[AddedToken], model_max_length: int = MAX_LENGTH):
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=special["unk_token"]))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([  # keep the regex matches, drop what is between
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_tokens(added)  # matched whole, before normalization unless normalized=True
        self._tokenizer, self.model_max_length = tok, model_max_length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            vocab[special[k]] for k in ("bos_token", "eos_token", "pad_token"))

    @classmethod
    def from_folder(cls, path) -> "CLIPTokenizer":
        """A tokenizer folder: vocab.json + merges.txt (SD v1 checkpoints) or tokenizer.json (newer
        saves), with optional tokenizer_config.json and special_tokens_map.json giving the special
        tokens and model_max_length."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"tokenizer folder {folder} not found; "
                                  "it should hold vocab.json + merges.txt or tokenizer.json")
        vocab, merges, tokenizer_json = _read_bpe(folder)
        config = read_json(folder / "tokenizer_config.json", optional=True)
        special, added = _special_tokens(folder, config, tokenizer_json)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if special[key] not in vocab:  # its id would fall past the text encoder's embedding table
                raise CheckpointError(f"{key} {special[key]!r} of tokenizer folder {folder} is not in its vocabulary")
        # transformers' default is "unlimited" (1e30) when the config is missing; CLIP's is 77
        length = config.get("model_max_length")
        length = length if type(length) is int and 2 < length <= 10_000 else MAX_LENGTH
        return cls(vocab, merges, special, added, length)

    def encode_without_special(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without bos/eos and untruncated (A1111 tokenizes the weighted
        fragments of a prompt this way, see prompt_syntax.py)."""
        return [e.ids for e in self._tokenizer.encode_batch(check_prompts(texts, "texts"), add_special_tokens=False)]

    def token_id(self, token: str) -> int | None:
        """The id of a token string such as ",</w>" (a whole-word comma), None if it has none."""
        return self._tokenizer.token_to_id(token)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """LongTensor [B, model_max_length]: bos, the first model_max_length - 2 tokens, eos, pads."""
        keep, rows = self.model_max_length - 2, []
        for ids in self.encode_without_special(check_prompts(prompts)):
            row = [self.bos_token_id, *ids[:keep], self.eos_token_id]
            rows.append(row + [self.pad_token_id] * (self.model_max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def truncated_text(self, prompts: str | list[str]) -> list[str]:
        """The text each prompt lost to truncation ("" if none), decoded as diffusers does for its
        "the following part of your input was truncated" warning."""
        encoded = self.encode_without_special(check_prompts(prompts))
        return [self.decode(ids[self.model_max_length - 2:]) for ids in encoded]

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text. Lossy: lower-cased, whitespace normalized, each "</w>" becomes a space."""
        text = self._tokenizer.decode(list(ids), skip_special_tokens=False)
        return text.replace("</w>", " ").strip()


def check_prompts(prompts, name: str = "prompts") -> list[str]:
    """A prompt or a list of them, as a list; anything else is refused naming the argument."""
    listed = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(listed, (list, tuple)) or not listed:
        raise InputError(f"{name}: expected a string or a non-empty list of strings, got {prompts!r:.80} "
                         f"({type(prompts).__name__})")
    for i, p in enumerate(listed):
        if not isinstance(p, str):
            raise InputError(f"{name}[{i}]: expected a string, got {type(p).__name__}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: how Python keeps undecodable argv bytes
            raise InputError(f"{name}[{i}]: not valid Unicode text ({e.reason}: {p[e.start:e.end]!r} at "
                             f"position {e.start}, from a byte that is not UTF-8); pass the prompt as UTF-8") from None
    return list(listed)


def load_tokenizer(pipeline_folder, device="cpu", dtype=torch.float32) -> CLIPTokenizer:
    """The tokenizer of a diffusers pipeline folder (`<folder>/tokenizer/`). device and dtype are
    accepted only so every component loader has the same signature."""
    return CLIPTokenizer.from_folder(Path(pipeline_folder) / "tokenizer")
