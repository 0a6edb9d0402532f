"""AUTOMATIC1111's prompt syntax: emphasis brackets, BREAK, and prompts longer than 75 tokens.

stable-diffusion-webui reads a prompt in two steps, both followed here exactly, quirks included
(https://github.com/AUTOMATIC1111/stable-diffusion-webui/wiki/Features#attentionemphasis):

  1. parse (modules/prompt_parser.py, parse_prompt_attention): the text becomes fragments with a
     weight each. `(text)` multiplies the weight of what it holds by 1.1, `[text]` by 1/1.1,
     `(text:1.5)` by 1.5; brackets nest and multiply. `\\(` `\\)` `\\[` `\\]` `\\\\` are the
     literal characters; the word BREAK (upper case, on its own) becomes the marker
     ("BREAK", -1.0). Neighbouring fragments of equal weight merge.
  2. chunk (modules/sd_hijack_clip.py, tokenize_line): each fragment is tokenized on its own and
     the tokens are packed into chunks of 75, each framed as bos + 75 + eos = 77 ids, one text
     encoder window. BREAK starts a new chunk. A chunk that fills up within 20 tokens after a
     comma ends at that comma, and the words after it move to the next chunk.

Worked example (SD v1 vocabulary, weights/clip):

    >>> parse_prompt_attention("a (red:1.5) cat, [blurry] photo BREAK sky")
    [('a ', 1.0), ('red', 1.5), (' cat, ', 1.0), ('blurry', 0.9090909090909091), (' photo', 1.0),
     ('BREAK', -1.0), ('sky', 1.0)]
    >>> chunks = chunk_prompt("a (red:1.5) cat, [blurry] photo BREAK sky", tokenizer)
    >>> len(chunks), chunks[0].ids[:8]  # bos a red cat , blurry photo eos
    (2, [49406, 320, 736, 2368, 267, 21977, 1125, 49407])
    >>> chunks[0].weights[:8]
    [1.0, 1.0, 1.5, 1.0, 1.0, 0.9090909090909091, 1.0, 1.0]
    >>> chunks[1].ids[:3]  # bos sky eos
    [49406, 2390, 49407]

The text encoder then encodes each chunk and scales each token's features by its weight
(not done here).
"""
import re
from dataclasses import dataclass

from .errors import InputError
from .tokenizer import CLIPTokenizer

CHUNK_BACKTRACK = 20  # A1111's comma_padding_backtrack default: how far back a comma may end a chunk
ROUND, SQUARE = 1.1, 1 / 1.1  # the factors of "(...)" and "[...]"

# One syntax token per match; the alternatives are tried in this order.
ATTENTION_TOKEN = re.compile(r"""
    \\\( | \\\) | \\\[ | \\] | \\\\   # escaped ( ) [ ] and backslash: the literal character
  | \\                                # a lone backslash (it becomes an empty fragment)
  | \( | \[                           # openers
  | :\s*([+-]?[.\d]+)\s*\)            # ":1.5)": closes a round bracket with that weight
  | \) | ]                            # closers
  | [^\\()\[\]:]+                     # plain text
  | :                                 # a colon that starts no weight
""", re.VERBOSE)
BREAK = re.compile(r"\s*\bBREAK\b\s*")  # eats the spaces around it


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Prompt -> [(fragment, weight)]; a BREAK is the fragment ("BREAK", -1.0).

    >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    [('a ', 1.0), ('house', 1.5730000000000004), (' ', 1.1), ('on', 1.0), (' a ', 1.1),
     ('hill', 0.55), (', sun, ', 1.1), ('sky', 1.4641000000000006), ('.', 1.1)]
    """
    if not isinstance(text, str):
        raise InputError(f"text: expected a string, got {type(text).__name__}")
    fragments: list[list] = []  # [text, weight]; a bracket multiplies the weights when it closes
    round_opened, square_opened = [], []  # stacks: the fragment index where each open bracket began

    def multiply(start: int, factor: float) -> None:
        # in place and in A1111's order (innermost bracket first), so the floats are bit-identical
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])  # never split at BREAK
        elif token == "(":
            round_opened.append(len(fragments))
        elif token == "[":
            square_opened.append(len(fragments))
        elif weight is not None and round_opened:
            multiply(round_opened.pop(), _weight(weight, token))
        elif token == ")" and round_opened:
            multiply(round_opened.pop(), ROUND)
        elif token == "]" and square_opened:
            multiply(square_opened.pop(), SQUARE)
        else:  # plain text, a ":", or a closer with nothing open (such as ":2)" after "[")
            parts = BREAK.split(token)  # "a BREAK b" -> ["a", "b"]; "BREAK" alone -> ["", ""]
            fragments.append([parts[0], 1.0])
            for part in parts[1:]:
                fragments += [["BREAK", -1.0], [part, 1.0]]
    # Brackets left open close at the end: all round ones (outermost first), then the square ones.
    for start in round_opened:
        multiply(start, ROUND)
    for start in square_opened:
        multiply(start, SQUARE)

    # Quirk: the merge compares weights only. A BREAK in brackets is just text ("(a BREAK b)" gives
    # ("BREAK", -1.1)); one whose neighbours end up with its weight merges ("(a BREAK b:0)" ->
    # ("aBREAKb", 0.0), as -0.0 == 0.0); the "" beside a BREAK ("a BREAK" -> "a", BREAK, "") stays.
    merged = [fragments[0]] if fragments else [["", 1.0]]
    for fragment in fragments[1:]:
        if fragment[1] == merged[-1][1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(fragment, weight) for fragment, weight in merged]


def _weight(number: str, token: str) -> float:
    # [.\d]+ also matches "1.2.3" or ".", where A1111's float() raises a ValueError (InputError is one)
    try:
        return float(number)
    except ValueError:
        raise InputError(f"text: {token!r} holds no number; write a weight like (word:1.2)") from None


@dataclass
class PromptChunk:
    """One text encoder window: bos, 75 prompt tokens padded with eos, eos."""
    ids: list[int]  # model_max_length token ids
    weights: list[float]  # one per id: its fragment's weight; 1.0 for bos, eos and padding


def chunk_prompt(text: str, tokenizer: CLIPTokenizer, comma_backtrack: int = CHUNK_BACKTRACK) -> list[PromptChunk]:
    """Prompt -> its chunks, at least one: A1111's tokenize_line with emphasis on and no
    textual-inversion embeddings. comma_backtrack=0 turns the comma rule off."""
    fragments = parse_prompt_attention(text)
    # Each fragment is tokenized on its own: "(photo)grapher" is "photo" + "grapher", not one word.
    token_lists = tokenizer.encode_without_special([fragment for fragment, _ in fragments])
    length, comma = tokenizer.model_max_length - 2, tokenizer.token_id(",</w>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks: list[PromptChunk] = []
    ids, weights, last_comma = [], [], -1  # the chunk being filled; where its last comma is

    def finish(keep: int) -> None:
        """Frame ids[:keep] as a chunk; what follows starts the next one."""
        nonlocal ids, weights, last_comma
        pad = length - keep
        chunks.append(PromptChunk([bos, *ids[:keep], *[eos] * pad, eos], [1.0, *weights[:keep], *[1.0] * pad, 1.0]))
        # Quirk: the comma is forgotten, so the next chunk backtracks only to a comma of its own,
        # and a comma that arrived when this chunk was full (it goes first in the next) is not one.
        ids, weights, last_comma = ids[keep:], weights[keep:], -1

    for (fragment, weight), tokens in zip(fragments, token_lists):
        if fragment == "BREAK" and weight == -1:  # only the marker: weight exactly -1
            finish(len(ids))  # even an empty chunk: then it is all padding
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == length and last_comma != -1 and len(ids) - last_comma <= comma_backtrack:
                finish(last_comma + 1)  # end at the comma; the tokens after it move on
            if len(ids) == length:  # a chunk is finished only when a token no longer fits
                finish(length)
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:  # a prompt with no tokens at all is one chunk of padding
        finish(len(ids))
    return chunks
