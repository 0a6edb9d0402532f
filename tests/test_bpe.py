"""minisd.bpe (plain Python) against minisd.tokenizer (the `tokenizers` library), on SD v1's real
49,408-token vocabulary (weights/clip). Tolerance: none, every id of every prompt must be equal.

The prompts are tests/test_tokenizer.py's (hand-written and generated; there minisd.tokenizer is
checked against transformers' CLIPTokenizer), plus the quirks minisd.bpe comments on, plus random
Unicode text. Ids are compared untruncated (so long prompts count past token 75) and in the 77-id
frame. Nothing is excluded, except in the random text characters that Python's unicodedata (Unicode
14 on Python 3.11) does not know yet: the fast path's newer tables call some of them letters. (Checked
once, outside the tests: f"a{c}b {c}{c}1 '{c}s" is equal for every other code point c.)
Needs transformers only because test_tokenizer.py, whose prompts these are, skips itself without it.
"""
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_tokenizer  # its prompt lists (tests/ is on sys.path under pytest)
from minisd.bpe import ReferenceBPE, bytes_to_unicode, normalize, split_words
from minisd.tokenizer import CLIPTokenizer

CLIP_VOCAB = Path(__file__).resolve().parents[1] / "weights" / "clip"

QUIRK_PROMPTS = [
    "ΟΔΟΣ ΣΟΦΙΑΣ", "a\x1cb\x1dc\x1ed\x1ff", "a\u180eb", "a\u2028b\u2029c\x85d\x0be",  # sigma; not spaces; spaces
    "x<|ENDOFTEXT|>'s", "!!<|STARTOFTEXT|>", "<|endoftext|>\u0338", "a\u0338<|endoftext|>\u0301",
    "'drive 'll've", "''s'''t", "İSTANBUL ǅ ᾼ ﬃ", "Ⅻ ⅷ ½ ١٢٣ ௰ ①", "a1b22c333", "e\u0301\u0301 \u1100\u1161\u11a8",
    "moonlit catgirl rutkowski artstation unrealengine", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]
PROMPTS = test_tokenizer.PROMPTS + QUIRK_PROMPTS


@pytest.fixture(scope="module")
def fast() -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(CLIP_VOCAB)


@pytest.fixture(scope="module")
def reference() -> ReferenceBPE:
    return ReferenceBPE.from_folder(CLIP_VOCAB)


def test_ids_equal_fast_tokenizer(fast, reference):
    want = fast.encode_without_special(PROMPTS)  # untruncated ids, no bos/eos
    assert len(PROMPTS) >= 400 and sum(len(ids) > 75 for ids in want) > 20
    bad = [(p, w, got) for p, w in zip(PROMPTS, want) if (got := reference.encode(p)) != w]
    assert not bad, f"{len(bad)} of {len(PROMPTS)} prompts differ, first {bad[0][0]!r}: fast {bad[0][1]}, reference {bad[0][2]}"
    assert [reference(p) for p in PROMPTS] == fast(PROMPTS).tolist()


def test_docstring_example(reference):
    assert reference.encode("Moonlit CAT's <|endoftext|> art!!") == [6334, 4350, 2368, 568, 49407, 794, 748]
    assert reference.bpe("moonlit") == ["moon", "lit</w>"]
    assert normalize("Moonlit CAT's\t\n") == "moonlit cat's "
    assert split_words("moonlit cat's ") == ["moonlit", "cat", "'s"]
    assert reference("a photo of an Astronaut")[:8] == [49406, 320, 1125, 539, 550, 18376, 49407, 49407]


def test_byte_table_is_the_vocabulary_base(reference):
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ"
    assert [reference.vocab[c] for c in table.values()] == list(range(256))  # the first 256 ids, in order
    assert all(reference.vocab[c + "</w>"] == reference.vocab[c] + 256 for c in table.values())  # then with </w>


def test_tokenizer_json_folder(tmp_path, fast, reference):
    fast._tokenizer.save(str(tmp_path / "tokenizer.json"))  # merges as [a, b] pairs
    from_json = ReferenceBPE.from_folder(tmp_path)
    assert from_json.vocab == reference.vocab and from_json.ranks == reference.ranks
    model = json.loads((tmp_path / "tokenizer.json").read_text())
    model["model"]["merges"] = [" ".join(m) for m in model["model"]["merges"]]  # older saves: "a b"
    (tmp_path / "tokenizer.json").write_text(json.dumps(model))
    assert ReferenceBPE.from_folder(tmp_path).ranks == reference.ranks


def test_merge_order_matters_on_these_prompts(fast, reference):
    """The prompts can tell a broken merge loop: merging the highest rank first differs on most."""
    merges = sorted(reference.ranks, key=reference.ranks.get)
    backwards = ReferenceBPE(reference.vocab, merges[::-1])
    differ = sum(backwards.encode(p) != w for p, w in zip(PROMPTS, fast.encode_without_special(PROMPTS)))
    assert differ > len(PROMPTS) // 2


PIECES = st.sampled_from(["<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "'s", "'LL", "'", " ", "\u0301"])
TEXT = st.lists(st.text(st.characters(exclude_categories=["Cn", "Cs"]), max_size=12) | PIECES, max_size=12).map("".join)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_random_text_equal(fast, reference, text):
    assert reference.encode(text) == fast.encode_without_special([text])[0]
