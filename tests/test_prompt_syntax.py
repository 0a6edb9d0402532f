"""minisd.prompt_syntax: A1111's emphasis parser and 75-token chunking.

Every expected value is worked out by hand from A1111's rules (modules/prompt_parser.py and
modules/sd_hijack_clip.py), or is one of A1111's own docstring examples. Weights are written as
the products A1111 forms, in its order, so float equality is exact. Token ids come straight
from the SD v1 vocabulary file, and the chunking prompts use one-token words ("a", "b", ",")
so that every token position is known.
"""
import json
from pathlib import Path

import pytest

from minisd.errors import InputError
from minisd.prompt_syntax import (
    CHUNK_BACKTRACK,
    PromptChunk,
    chunk_prompt,
    parse_prompt_attention,
)
from minisd.tokenizer import CLIPTokenizer

CLIP_VOCAB = Path(__file__).resolve().parents[1] / "weights" / "clip"
VOCAB = json.loads((CLIP_VOCAB / "vocab.json").read_text(encoding="utf-8"))
A, B, COMMA, BREAK_WORD = VOCAB["a</w>"], VOCAB["b</w>"], VOCAB[",</w>"], VOCAB["break</w>"]
BOS, EOS = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]
UP, DOWN = 1.1, 1 / 1.1


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(CLIP_VOCAB)


def frame(ids: list[int], weights: list[float] | None = None) -> PromptChunk:
    """A chunk by the rule: bos, the ids, eos up to 76, eos; weight 1.0 outside the ids."""
    weights = [1.0] * len(ids) if weights is None else weights
    pad = 75 - len(ids)
    return PromptChunk([BOS, *ids, *[EOS] * pad, EOS], [1.0, *weights, *[1.0] * pad, 1.0])


# ---- parsing ----

A1111_DOCSTRING = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

CASES = [
    # nesting multiplies, innermost bracket first
    ("((a))", [("a", 1.0 * UP * UP)]),
    ("[[a]]", [("a", 1.0 * DOWN * DOWN)]),
    ("([a])", [("a", 1.0 * DOWN * UP)]),
    ("(a [b] c)", [("a ", UP), ("b", 1.0 * DOWN * UP), (" c", UP)]),
    ("((a:1.5))", [("a", 1.0 * 1.5 * UP)]),
    ("[(a:2) b]", [("a", 1.0 * 2.0 * DOWN), (" b", DOWN)]),
    # escapes: the literal character, never syntax; a lone backslash is dropped
    (r"\(a\)", [("(a)", 1.0)]),
    (r"\[a\]", [("[a]", 1.0)]),
    (r"a\\b", [("a\\b", 1.0)]),
    (r"\\(a)", [("\\", 1.0), ("a", UP)]),
    (r"a\b", [("ab", 1.0)]),
    (r"a\ b", [("a b", 1.0)]),
    ("a\\", [("a", 1.0)]),
    (r"(\))", [(")", UP)]),
    # closers with nothing open are text
    ("a)b", [("a)b", 1.0)]),
    ("a]b", [("a]b", 1.0)]),
    ("(a]b)", [("a]b", UP)]),
    ("[a)b]", [("a)b", DOWN)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),
    ("[a:2)]", [("a:2)", DOWN)]),
    # brackets left open close at the end: every round one, then every square one
    ("((a", [("a", 1.0 * UP * UP)]),
    ("(a [b", [("a ", UP), ("b", 1.0 * UP * DOWN)]),
    ("[a (b", [("a ", DOWN), ("b", 1.0 * UP * DOWN)]),
    ("(a) [b", [("a", UP), (" ", 1.0), ("b", DOWN)]),
    ("([(b:0.7)", [("b", 1.0 * 0.7 * UP * DOWN)]),  # the outer "(" before the inner "[": 0.7, not
    ("([(b:0.7)])", [("b", 1.0 * 0.7 * DOWN * UP)]),  # 0.7000000000000001 as when both are closed
    # explicit weights
    ("(word:0.5)", [("word", 0.5)]),
    ("(word: 1.25 )", [("word", 1.25)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:x)", [("a:x", UP)]),  # not a weight: ":" is text and ")" closes with 1.1
    ("(a:1.5 x)", [("a:1.5 x", UP)]),
    ("(a:)", [("a:", UP)]),
    ("a: b", [("a: b", 1.0)]),
    # BREAK: upper case, a word of its own, only in plain text; eats the spaces around it
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a  \n BREAK\t b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(x) BREAK y", [("x", UP), ("", 1.0), ("BREAK", -1.0), ("y", 1.0)]),
    (r"\(BREAK\)", [("(", 1.0), ("BREAK", -1.0), (")", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("BREAK_x", [("BREAK_x", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("(a BREAK b)", [("a", UP), ("BREAK", -1.0 * UP), ("b", UP)]),  # just text, weight -1.1
    ("(BREAK:-1)", [("", -1.0), ("BREAK", 1.0), ("", -1.0)]),
    # neighbours of equal weight merge, whatever their text
    ("(a)(b)", [("ab", UP)]),
    ("((a)(b))", [("ab", 1.0 * UP * UP)]),
    ("a (b:1) c", [("a b c", 1.0)]),
    ("(a)[b]", [("a", UP), ("b", DOWN)]),
    (r"a\(b", [("a(b", 1.0)]),
    ("(a BREAK b:0)", [("aBREAKb", 0.0)]),  # the BREAK's -0.0 equals its neighbours' 0.0
    ("(BREAK BREAK:0)", [("BREAKBREAK", 0.0)]),
    # nothing at all
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("[(:2)]", [("", 1.0)]),
]


def test_the_package_exports_the_parser():
    import minisd
    assert minisd.parse_prompt_attention is parse_prompt_attention


@pytest.mark.parametrize("text, expected", A1111_DOCSTRING + CASES)
def test_parse(text, expected):
    got = parse_prompt_attention(text)
    assert got == expected
    assert all(type(f) is tuple and type(f[0]) is str and type(f[1]) is float for f in got)


def test_weights_are_multiplied_in_a1111_order():
    # each bracket as it closes, innermost first: 0.7, then / 1.1, then * 1.1 is not 0.7 again
    expected = 1.0 * 0.7 * DOWN * UP
    assert expected != 0.7  # so a net factor of 1.0, or a count of brackets, would give another float
    assert parse_prompt_attention("([(a:0.7)])") == [("a", expected)]


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:..5)"])
def test_a_weight_that_is_no_number_is_an_input_error(text):
    with pytest.raises(InputError, match="weight"):  # A1111's float() raises a ValueError here
        parse_prompt_attention(text)


def test_non_string_is_an_input_error(tok):
    with pytest.raises(InputError, match="text"):
        parse_prompt_attention(None)
    with pytest.raises(InputError, match="text"):
        chunk_prompt(["a"], tok)


# ---- tokenizer additions ----

def test_token_id(tok):
    assert tok.token_id(",</w>") == VOCAB[",</w>"] == COMMA
    assert tok.token_id("a</w>") == A and tok.token_id("<|endoftext|>") == EOS
    assert tok.token_id("not a token") is None


def test_encode_without_special_matches_transformers(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(CLIP_VOCAB))
    fragments = ["a ", "house", " (with", ", sun, ", "", "BREAK", "Ærøskøbing 日本", "it's", "grapher",
                 "portrait, " * 40]
    expected = ref(fragments, add_special_tokens=False, truncation=False)["input_ids"]  # A1111's call
    assert tok.encode_without_special(fragments) == expected
    assert len(expected[-1]) == 80  # untruncated


def test_encode_without_special_names_a_bad_text(tok):
    with pytest.raises(InputError, match=r"texts\[1\]"):
        tok.encode_without_special(["a", 3])


# ---- chunking ----

def test_chunks_have_model_max_length_ids_and_weights(tok):
    for text in ["", "a", "a " * 80, "a BREAK b", "(a:1.5), " * 50]:
        for chunk in chunk_prompt(text, tok):
            assert len(chunk.ids) == len(chunk.weights) == 77 and chunk.ids[0] == BOS and chunk.ids[-1] == EOS


@pytest.mark.parametrize("text", ["a photo of an astronaut riding a horse on mars", "hello, world!",
                                  "portrait of a woman, by greg rutkowski, trending on artstation"])
def test_a_short_prompt_is_the_plain_tokenizers_ids(tok, text):
    assert chunk_prompt(text, tok) == [PromptChunk(tok([text])[0].tolist(), [1.0] * 77)]


@pytest.mark.parametrize("text", ["", "   ", "()", "[(:2)]"])
def test_no_tokens_is_one_chunk_of_padding(tok, text):
    assert chunk_prompt(text, tok) == [PromptChunk([BOS] + [EOS] * 76, [1.0] * 77)]


def test_75_tokens_fill_one_chunk_76_need_two(tok):
    assert chunk_prompt("a " * 75, tok) == [frame([A] * 75)]
    assert chunk_prompt("a " * 76, tok) == [frame([A] * 75), frame([A])]
    assert chunk_prompt("a " * 151, tok) == [frame([A] * 75), frame([A] * 75), frame([A])]


def test_chunk_length_follows_model_max_length(tok):
    short = CLIPTokenizer.from_folder(CLIP_VOCAB)
    short.model_max_length = 10  # chunks of 8 tokens
    chunks = chunk_prompt("a " * 9, short)
    assert [c.ids for c in chunks] == [[BOS, *[A] * 8, EOS], [BOS, A, *[EOS] * 8]]


def test_break_ends_the_chunk(tok):
    assert chunk_prompt("a BREAK b", tok) == [frame([A]), frame([B])]
    assert chunk_prompt("BREAK b", tok) == [frame([]), frame([B])]  # the empty chunk is kept
    assert chunk_prompt("BREAK", tok) == [frame([])]
    assert chunk_prompt("a BREAK", tok) == [frame([A])]  # nothing after: no second chunk
    assert chunk_prompt("a BREAK BREAK b", tok) == [frame([A]), frame([]), frame([B])]
    # a full chunk waits for the next token to be finished: BREAK finishes it, no empty chunk
    assert chunk_prompt("a " * 75 + "BREAK b", tok) == [frame([A] * 75), frame([B])]


def test_break_with_another_weight_is_a_word(tok):
    assert chunk_prompt("(a BREAK b)", tok) == [frame([A, BREAK_WORD, B], [UP, -1.0 * UP, UP])]
    assert chunk_prompt("(BREAK:-1)", tok) == [frame([BREAK_WORD], [1.0])]
    assert chunk_prompt("BREAKFAST", tok) == [PromptChunk(tok(["BREAKFAST"])[0].tolist(), [1.0] * 77)]


def test_comma_backtracking(tok):
    # 60 a, "," at 60, 20 b: at the 76th token the comma is 75 - 60 = 15 back: the 14 b after it move
    assert chunk_prompt("a " * 60 + ", " + "b " * 20, tok) == [frame([A] * 60 + [COMMA]), frame([B] * 20)]
    # 75 - 55 = 20: still moves (19 b)
    assert chunk_prompt("a " * 55 + ", " + "b " * 20, tok) == [frame([A] * 55 + [COMMA]), frame([B] * 20)]
    # 75 - 54 = 21 > 20: the chunk is cut at 75 tokens
    assert chunk_prompt("a " * 54 + ", " + "b " * 21, tok) == [frame([A] * 54 + [COMMA] + [B] * 20), frame([B])]
    # the last comma counts: the one at 61, 14 back
    text = "a " * 50 + ", " + "a " * 10 + ", " + "b " * 20
    assert chunk_prompt(text, tok) == [frame([A] * 50 + [COMMA] + [A] * 10 + [COMMA]), frame([B] * 20)]
    # a comma as the chunk's last token: the same cut either way
    assert chunk_prompt("a " * 74 + ", b", tok) == [frame([A] * 74 + [COMMA]), frame([B])]


def test_a_finished_chunk_forgets_its_comma(tok):
    # 60 a, "," at 60, 100 b: the first cut is at the comma; the next chunk is 75 b with no comma of its
    # own, so it is cut at 75 (the old comma, 15 back in the first chunk's count, no longer counts)
    text = "a " * 60 + ", " + "b " * 100
    assert chunk_prompt(text, tok) == [frame([A] * 60 + [COMMA]), frame([B] * 75), frame([B] * 25)]
    # a chunk ended by BREAK forgets it too
    text = "a " * 60 + ", b BREAK " + "b " * 76
    assert chunk_prompt(text, tok) == [frame([A] * 60 + [COMMA, B]), frame([B] * 75), frame([B])]


def test_comma_backtrack_setting(tok):
    assert CHUNK_BACKTRACK == 20
    text = "a " * 60 + ", " + "b " * 20
    assert chunk_prompt(text, tok, comma_backtrack=0) == [frame([A] * 60 + [COMMA] + [B] * 14), frame([B] * 6)]
    text = "a " * 54 + ", " + "b " * 21
    assert chunk_prompt(text, tok, comma_backtrack=21) == [frame([A] * 54 + [COMMA]), frame([B] * 21)]


def test_a_comma_first_in_a_chunk_after_a_full_one_is_forgotten(tok):
    # Quirk: the comma arrives when the chunk is full; finishing that chunk forgets the comma, and
    # the comma goes first in the next chunk unremembered, so even a backtrack of 75 does not cut there.
    text = "a " * 75 + ", " + "b " * 75
    assert chunk_prompt(text, tok, comma_backtrack=75) == [frame([A] * 75), frame([COMMA] + [B] * 74), frame([B])]
    # the same comma first in a chunk that starts empty is remembered: 75 - 0 <= 75 cuts after it
    assert chunk_prompt(", " + "b " * 75, tok, comma_backtrack=75) == [frame([COMMA]), frame([B] * 75)]


def test_weights_are_carried_to_tokens(tok):
    assert chunk_prompt("a (b:1.5) [a] ((b))", tok) == [frame([A, B, A, B], [1.0, 1.5, DOWN, 1.0 * UP * UP])]
    assert chunk_prompt("(a:-1)", tok) == [frame([A], [-1.0])]  # only ("BREAK", -1) is a break
    # tokens moved by a comma keep their weights
    chunks = chunk_prompt("a " * 60 + ", (" + "b " * 20 + ")", tok)
    assert chunks == [frame([A] * 60 + [COMMA]), frame([B] * 20, [UP] * 20)]


def test_each_fragment_is_tokenized_alone(tok):
    assert tok(["photographer"])[0, 1].item() == VOCAB["photographer</w>"]
    assert chunk_prompt("(photo)grapher", tok) == [frame([VOCAB["photo</w>"], VOCAB["grapher</w>"]], [UP, 1.0])]
