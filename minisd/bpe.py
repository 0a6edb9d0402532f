"""CLIP's tokenizer in plain Python: the ids of minisd.tokenizer, from scratch, to read.

minisd.tokenizer runs on the `tokenizers` library (Rust); this is the same algorithm in standard-
library Python, and tests/test_bpe.py checks that both give the same ids. It follows OpenAI CLIP's
https://github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py, and minisd where they differ.

Worked example (SD v1's vocabulary, weights/clip):

    >>> bpe = ReferenceBPE.from_folder("weights/clip")
    >>> bpe.encode("Moonlit CAT's <|endoftext|> art!!")
    [6334, 4350, 2368, 568, 49407, 794, 748]

  1. special tokens, typed exactly, are cut out of the raw text: "<|endoftext|>" is id 49407
  2. normalize the rest: NFC, whitespace runs -> " ", lower-case: "moonlit cat's ", " art!!"
  3. words: "moonlit", "cat", "'s", "art", "!!" (spaces are dropped, never a token)
  4. bytes -> characters: each UTF-8 byte becomes one printable character (ASCII stays as is)
  5. BPE inside each word, from single characters, "</w>" on the last. For "moonlit", by rank:
         m o o n l i t</w>  -(o n: 9)->  m o on l i t</w>  -(l i: 42)->  m o on li t</w>
         -(m o: 105)->  mo on li t</w>  -(li t</w>: 3838)->  mo on lit</w>  -(mo on: 5822)->  moon lit</w>
     so "moon" (6334) + "lit</w>" (4350); then "cat</w>" 2368, "'s</w>" 568, "art</w>" 794,
     "!!</w>" 748. "moon" without "</w>" starts a word: a different token from "moon</w>".

Unlike OpenAI's, as minisd and transformers 5 do: no ftfy.fix_text and no html.unescape ("&amp;"
stays four characters), and a special token typed in another case ("<|EndOfText|>") is text, not
the special token (OpenAI lower-cases first).
Unlike minisd's fast path: that reads which special tokens match case-insensitively from
tokenizer_config.json / special_tokens_map.json; only CompVis SD v1's files mark one so (then
"<|StartOfText|>" is bos). Here both match case-sensitively, as for weights/clip and minisd-shapes.
And characters newer than Python's unicodedata (Unicode 14 on Python 3.11; U+1C89, say) are not
letters here but are in the fast path: every code point Python knows was checked equal.
"""
import json
import re
import unicodedata
from pathlib import Path

SPECIALS = ("<|startoftext|>", "<|endoftext|>")  # bos, and eos = SD v1's pad
SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte -> one printable character. The 188 bytes that print as Latin-1 map to
    themselves; the other 68 (controls, space, 0x7f-0xa0, soft hyphen) to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # space (0x20) is the 33rd: "Ġ", U+0120
    # in this order (printable first) the 256 characters are the vocabulary's ids 0-255
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = bytes_to_unicode()


def is_space(c: str) -> bool:
    """Unicode White_Space, what the fast path's regex \\s matches. Quirk: not Python's isspace(),
    which also counts the separators U+001C-U+001F (to CLIP they are punctuation)."""
    return c in "\t\n\v\f\r\x85" or unicodedata.category(c) in ("Zs", "Zl", "Zp")


def normalize(text: str) -> str:
    """NFC, every run of whitespace -> one space, lower-case."""
    out = []
    for c in unicodedata.normalize("NFC", text):
        if is_space(c):
            if out and out[-1] == " ":
                continue
            c = " "
        # Quirk: one character at a time, as Rust does: "ΟΔΟΣ" -> "οδοσ", where Python's
        # str.lower() would give "οδος" (it applies the final-sigma rule to whole words)
        out.append(c.lower())
    return "".join(out)


def _kind(c: str) -> str:
    """"L" letter (\\p{L}), "N" number (\\p{N}), " " space, "P" anything else (punctuation, emoji, ...)."""
    category = unicodedata.category(c)
    return category[0] if category[0] in "LN" else " " if is_space(c) else "P"


def split_words(text: str) -> list[str]:
    """CLIP's regex, one alternative after another at each position: <|startoftext|>|<|endoftext|>|
    's|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+ ; whatever none matches (spaces) is dropped."""
    words, i = [], 0
    while i < len(text):
        special = next((s for s in SPECIALS if text.startswith(s, i)), None)
        contraction = next((s for s in CONTRACTIONS if text.startswith(s, i)), None)
        kind = _kind(text[i])
        if special:  # Quirk: kept whole by CLIP's regex, then split again by the GPT-2 regex of the
            words += [special[:2], special[2:-2], special[-2:]]  # byte-level step: "<|" "endoftext" "|>"
            i += len(special)
        elif contraction:  # Quirk: also inside words: "'drive" -> "'d" "rive"
            words.append(contraction)
            i += len(contraction)
        elif kind == " ":
            i += 1
        elif kind == "N":  # one digit a word: "1920" is four words
            words.append(text[i])
            i += 1
        else:  # a run of letters, or a run of everything else ("!!", "🚀🚀", "''")
            j = i + 1
            while j < len(text) and _kind(text[j]) == kind:
                j += 1
            words.append(text[i:j])
            i = j
    return words


class ReferenceBPE:
    """Text -> CLIP token ids in plain Python. Build it with `from_folder`."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab = vocab
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}  # earlier = merged first
        self.cache: dict[str, list[str]] = {}  # word -> pieces; grows with every new word seen

    @classmethod
    def from_folder(cls, path) -> "ReferenceBPE":
        """vocab.json + merges.txt (SD v1 checkpoints), or tokenizer.json (newer saves). A
        reader's reference: it trusts its files, which minisd.tokenizer checks."""
        folder = Path(path)
        if (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]  # "a b" or [a, b]
            return cls(model["vocab"], merges)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        return cls(vocab, [line.split(" ") for line in lines if line and not line.startswith("#version")])

    def bpe(self, word: str) -> list[str]:
        """One byte-mapped word -> its tokens: start from single characters, the last one with
        "</w>", and keep merging the adjacent pair that ranks lowest (was learned first)."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:  # no pair left that the merges know
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without bos/eos and untruncated."""
        ids = []
        # Quirk: special tokens are cut out of the raw text before normalizing, so only the exact
        # lower-case spelling counts, and each piece between them is normalized on its own
        for k, piece in enumerate(SPECIAL_SPLIT.split(text)):
            if k % 2:  # re.split puts the matched separators at the odd positions
                ids.append(self.vocab[piece])
                continue
            for word in split_words(normalize(piece)):
                chars = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
                ids += [self.vocab[token] for token in self.bpe(chars)]
        return ids

    def __call__(self, text: str, length: int = 77) -> list[int]:
        """The text encoder's frame: bos, the first length - 2 ids, eos, then eos again as padding
        (SD v1 pads with <|endoftext|>; SD 2 pads with "!", id 0, which this does not do)."""
        bos, eos = (self.vocab[s] for s in SPECIALS)
        row = [bos, *self.encode(text)[:length - 2], eos]
        return row + [eos] * (length - len(row))
