"""minisd.tokenizer against transformers' CLIPTokenizer (the reference diffusers calls), token for token.

The reference is called the way diffusers' StableDiffusionPipeline calls it:
`tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`. Folder forms tested:
the real small-sd layout (vocab.json + merges.txt + special_tokens_map.json + tokenizer_config.json),
the bare vocabulary, SD 2's pad "!" (in both configs, or in special_tokens_map.json alone), a
tokenizer.json written by transformers' save_pretrained, and an older-style tokenizer.json
("a b" merge strings, added_tokens_decoder in the config).
"""
import ast
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from minisd.errors import CheckpointError, InputError
from minisd.tokenizer import CLIPTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

CLIP_VOCAB = Path(__file__).resolve().parents[1] / "weights" / "clip"
MAX_LENGTH = 77


def _added(content):  # how transformers 4.2x wrote a special token into tokenizer_config.json
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


# the real small-sd (= CompVis SD v1-4) tokenizer/ configs
SD1_CONFIG = {"add_prefix_space": False, "bos_token": _added("<|startoftext|>"), "do_lower_case": True,
              "eos_token": _added("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
              "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
              "unk_token": _added("<|endoftext|>")}
SD1_SPECIAL_MAP = {k: ({f: x for f, x in v.items() if f != "__type"} if isinstance(v, dict) else v)
                   for k, v in SD1_CONFIG.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}

HAND_PROMPTS = [
    "", " ", "   \t\n  ", "a", "A", "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT Riding A Horse On Mars", "hello, world!", "hello,world!!!", "!!!", "!", "?!?!",
    "(masterpiece:1.2), best quality, ((ultra-detailed)), [blurry], {cat|dog}, 8k uhd, dslr",
    "portrait of a woman, by greg rutkowski and alphonse mucha, trending on artstation",
    "it's", "don't", "they're", "I've", "I'm", "we'll", "he'd", "IT'S DON'T", "it’s curly", "''s", "'", "'s's",
    "rock'n'roll", "o'clock", "1920s", "3.14159", "1,000,000", "2024-01-01", "0123456789", "½ ² ⅓ ④",
    "café", "cafe\u0301 (decomposed)", "naïve résumé Zoë Ærøskøbing", "STRASSE straße ß", "İstanbul ı",
    "ﬁne ligature", "ＡＢＣ fullwidth １２３", "Москва Россия", "Ελληνικά ΣΟΦΙΑ", "العربية", "हिन्दी",
    "日本の風景、富士山", "東京タワー", "한국어 프롬프트", "中文提示词：一只猫", "🚀 rocket", "👩‍🚀 astronaut",
    "🇯🇵 flag", "❤️🔥", "tab\tseparated\twords", "new\nline\r\nwindows\rmac", "non\u00a0breaking\u00a0space",
    "ideographic\u3000space", "em\u2003space", "zero\u200bwidth", "nel\u0085char", "null\x00byte", "del\x7fchar",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp;", "salt &amp; pepper", "AT&T", "<b>bold</b>",
    "<|endoftext|>", "<|startoftext|>", "a<|endoftext|>b", "a <|endoftext|> b", "<|ENDOFTEXT|>",
    "<|StartOfText|> upper", "<|endoftext|", "<|endoftext|><|endoftext|>", "x<|endoftext|>'s", "hi</w>",
    "</w>", "<|", "|>", "\\n literal backslash", "C:\\path\\to\\file", "user@example.com https://a.b/c?d=e",
    "#hashtag @mention $100 %50 ^_^ ~tilde~ `code` *bold* _under_ +plus= ;semi: <>",
    "a" * 300, "ab " * 100, "word " * 80, "🙂" * 40, "日本" * 60, "!" * 200,
    ", ".join(["masterpiece", "best quality"] * 30),
    " ".join(f"token{i}" for i in range(60)),
    "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3,
]

WORDS = ["a", "photo", "of", "astronaut", "horse", "Mars", "cyberpunk", "city", "NEON", "lights", "portrait",
         "masterpiece", "best quality", "ultra-detailed", "8k", "4K", "uhd", "dslr", "bokeh", "f/1.8", "85mm",
         "octane render", "Unreal Engine 5", "trending on ArtStation", "by Greg Rutkowski", "studio ghibli",
         "it's", "don't", "we're", "café", "façade", "jalapeño", "Zürich", "Ångström", "东京", "猫", "ラーメン",
         "서울", "Ñandú", "Łódź", "🚀", "🐱", "✨", "👍🏽", "&amp;", "&lt;3", "<|endoftext|>", "<|startoftext|>",
         "1999", "3.5", "x2", "v1.4", "!", "!!", "?", "...", "--ar 16:9", "(", ")", "[", "]", "{", "}", "|",
         "+", "-", "_", "/", "\\", "'", '"', "#", "%", "@", "ﬂ", "Ⅻ", "½"]
SEPARATORS = [" ", " ", ", ", ",", "  ", "\t", "\n", "\r\n", "\u00a0", " | ", "", "...", "\u3000", " . "]


def _generated_prompts(n: int = 320, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        count = rng.choice([1, 2, 3, 5, 8, 12, 20]) if rng.random() < 0.85 else rng.randint(40, 120)
        pieces = []
        for _ in range(count):
            w = rng.choice(WORDS)
            style = rng.random()
            w = w.upper() if style < 0.1 else w.title() if style < 0.2 else w
            if rng.random() < 0.1:
                w = f"({w}:{rng.uniform(0.5, 1.8):.1f})"
            elif rng.random() < 0.05:
                w = "((" + w + "))"
            pieces.append(w + rng.choice(SEPARATORS))
        prompt = "".join(pieces)
        if rng.random() < 0.15:
            prompt = rng.choice([" ", "\n", "\t ", "\u00a0"]) + prompt
        prompts.append(prompt)
    return prompts


PROMPTS = HAND_PROMPTS + _generated_prompts()


def _reference(folder: Path):
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def _reference_ids(ref, prompts: list[str]) -> torch.Tensor:
    out = ref(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    return torch.tensor(out["input_ids"], dtype=torch.long)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    sd1 = root / "sd1"  # the real small-sd form
    shutil.copytree(CLIP_VOCAB, sd1)
    (sd1 / "tokenizer_config.json").write_text(json.dumps(SD1_CONFIG, indent=2))
    (sd1 / "special_tokens_map.json").write_text(json.dumps(SD1_SPECIAL_MAP, indent=2))
    sd2 = root / "sd2"  # SD 2 pads with "!"
    shutil.copytree(sd1, sd2)
    (sd2 / "tokenizer_config.json").write_text(json.dumps({**SD1_CONFIG, "pad_token": "!"}))
    (sd2 / "special_tokens_map.json").write_text(json.dumps({**SD1_SPECIAL_MAP, "pad_token": "!"}))
    saved = root / "saved"  # tokenizer.json + tokenizer_config.json, as transformers 5 saves
    _reference(sd1).save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
    old = root / "old_json"  # older saves: "a b" merge strings, every added token in the config
    old.mkdir()
    tj = json.loads((saved / "tokenizer.json").read_text())
    tj["model"]["merges"] = [" ".join(m) for m in tj["model"]["merges"]]
    (old / "tokenizer.json").write_text(json.dumps(tj))
    decoder = {str(t.pop("id")): t for t in tj["added_tokens"]}
    decoder["49407"]["normalized"] = True  # differs from the sd1 flags: must be read, not assumed
    (old / "tokenizer_config.json").write_text(json.dumps({**SD1_CONFIG, "added_tokens_decoder": decoder}))
    map_only = root / "map_only"  # special_tokens_map.json alone decides (pad "!")
    shutil.copytree(CLIP_VOCAB, map_only)
    (map_only / "special_tokens_map.json").write_text(json.dumps({**SD1_SPECIAL_MAP, "pad_token": "!"}))
    return {"bare": CLIP_VOCAB, "sd1": sd1, "sd2": sd2, "saved": saved, "old_json": old, "map_only": map_only}


def test_prompt_variety():
    assert len(PROMPTS) >= 300 and len(set(PROMPTS)) > 300


@pytest.mark.parametrize("form", ["sd1", "bare", "sd2", "saved", "old_json", "map_only"])
def test_ids_match_transformers(folders, form):
    ours = CLIPTokenizer.from_folder(folders[form])
    ref = _reference(folders[form])
    got, want = ours(PROMPTS), _reference_ids(ref, PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), MAX_LENGTH)
    bad = [i for i in range(len(PROMPTS)) if not torch.equal(got[i], want[i])]
    assert not bad, f"{len(bad)} prompts differ, first {PROMPTS[bad[0]]!r}:\n{got[bad[0]].tolist()}\n{want[bad[0]].tolist()}"
    assert ours.pad_token_id == ref.pad_token_id and ours.model_max_length == MAX_LENGTH


def test_docstring_example_and_special_ids(folders):
    tok = CLIPTokenizer.from_folder(folders["sd1"])
    assert tok("a photo of an Astronaut")[0, :8].tolist() == [49406, 320, 1125, 539, 550, 18376, 49407, 49407]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok("")[0].tolist() == [49406] + [49407] * 76
    assert CLIPTokenizer.from_folder(folders["sd2"])("")[0].tolist() == [49406, 49407] + [0] * 75
    long = tok(["word " * 200])[0]  # bos, the first 75 tokens, eos
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] == long[1]).all()


def test_truncated_text_matches_diffusers_warning(folders):
    """diffusers: untruncated = tokenizer(p, padding="longest"); removed = batch_decode(untruncated[:, 76:-1])."""
    ours, ref = CLIPTokenizer.from_folder(folders["sd1"]), _reference(folders["sd1"])
    got = ours.truncated_text(PROMPTS)
    n_cut = 0
    for prompt, removed in zip(PROMPTS, got):
        untruncated = ref(prompt)["input_ids"]
        want = ref.decode(untruncated[MAX_LENGTH - 1 : -1]) if len(untruncated) > MAX_LENGTH else ""
        assert removed == want, repr(prompt)
        n_cut += bool(removed)
    assert n_cut > 20
    assert ours.truncated_text("a cat") == [""]
    assert ours.truncated_text(["word " * 80]) == ["word word word word word"]


def test_model_max_length_from_config(tmp_path, folders):
    folder = tmp_path / "tok"
    shutil.copytree(folders["sd1"], folder)
    for value, expected in [(64, 64), (10**30, MAX_LENGTH), ("77", MAX_LENGTH), (None, MAX_LENGTH)]:
        (folder / "tokenizer_config.json").write_text(json.dumps({**SD1_CONFIG, "model_max_length": value}))
        tok = CLIPTokenizer.from_folder(folder)
        assert tok.model_max_length == expected and tok(["x " * 100]).shape == (1, expected)


def test_load_tokenizer_reads_pipeline_subfolder(tmp_path, folders):
    shutil.copytree(folders["sd1"], tmp_path / "tokenizer")
    tok = load_tokenizer(tmp_path, device="cuda", dtype=torch.float16)  # both ignored
    assert tok("a")[0, :3].tolist() == [49406, 320, 49407]


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="nope"):
        CLIPTokenizer.from_folder(tmp_path / "nope")
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_bytes((CLIP_VOCAB / "vocab.json").read_bytes())
    with pytest.raises(CheckpointError, match="merges.txt"):
        CLIPTokenizer.from_folder(folder)


@pytest.mark.parametrize("name, content, match", [
    ("vocab.json", '{"a": 1,', "vocab.json"),  # truncated JSON
    ("vocab.json", '["a", "b"]', "vocab.json"),  # not a dict
    ("vocab.json", '{"a": "1"}', "vocab.json"),  # ids not ints
    ("merges.txt", "#version: 0.2\ni n\nthree parts here\n", "merges.txt line 3"),
    ("merges.txt", "#version: 0.2\n\u4e00 \u4e8c\n", "merges.txt"),  # tokens not in the vocabulary
    ("tokenizer_config.json", "{not json", "tokenizer_config.json"),
    ("special_tokens_map.json", '{"pad_token": "<|not-a-token|>"}', "pad_token"),
    ("tokenizer.json", '{"model": {"type": "WordPiece"}}', "tokenizer.json"),
])
def test_corrupt_files(tmp_path, folders, name, content, match):
    folder = tmp_path / "tok"
    shutil.copytree(folders["sd1"], folder)
    (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match=match):
        CLIPTokenizer.from_folder(folder)


def test_bad_prompts(folders):
    tok = CLIPTokenizer.from_folder(folders["bare"])
    with pytest.raises(InputError, match="prompts.*int"):
        tok(3)
    with pytest.raises(InputError, match=r"prompts\[1\].*NoneType"):
        tok(["a", None])
    with pytest.raises(InputError, match="prompts.*bytes"):
        tok.truncated_text(b"a cat")
    with pytest.raises(InputError, match="empty"):
        tok([])
    with pytest.raises(InputError, match=r"prompts\[0\].*Unicode"):
        tok("caf\udce9")  # what a non-UTF-8 byte in argv becomes
    assert isinstance(InputError("x"), ValueError)


def test_imports_only_runtime_deps():
    """transformers/diffusers are test references only. (Checked on the source: a subprocess
    importing torch would cost ~3 s; the package-wide import check belongs to the package tests.)"""
    import minisd.tokenizer as module
    tree = ast.parse(Path(module.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert roots <= {"json", "pathlib", "torch", "tokenizers"}, roots
