"""Build CLIP's BPE vocabulary (vocab.json + merges.txt) from OpenAI's merge list.

The 49,408-token vocabulary every SD v1 checkpoint uses is not stored anywhere as a
vocabulary: OpenAI's CLIP derives it at start-up from `bpe_simple_vocab_16e6.txt.gz`,
a list of BPE merges. The `open_clip_torch` wheel ships that file. This tool repeats the
derivation of `SimpleTokenizer.__init__` in
https://github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py and writes the result in
the Hugging Face layout (`vocab.json`, `merges.txt` with a `#version` header).

    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    python tools/make_clip_vocab.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl /tmp/clip

Existing files are replaced only with `--overwrite`; to rebuild the shipped vocabulary, pass
`weights/clip --overwrite`. The ids are checked against transformers' CLIPTokenizer in
tests/test_tokenizer.py.
"""
import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_FILE_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps lines [1, 48895): 48,894 merges
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (GPT-2's trick), so BPE never sees
    whitespace or control bytes. Printable latin-1 bytes map to themselves."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def build_vocab(bpe_lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = [tuple(line.split()) for line in bpe_lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]  # each byte, then each byte ending a word
    tokens += ["".join(pair) for pair in merges]
    tokens += SPECIAL_TOKENS
    return {tok: i for i, tok in enumerate(tokens)}, merges


def read_bpe_lines(source: Path) -> list[str]:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(BPE_FILE_IN_WHEEL)
    else:
        data = source.read_bytes()
    return gzip.decompress(data).decode("utf-8").split("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel, or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace vocab.json and merges.txt if they exist")
    args = parser.parse_args()
    existing = [path for path in (args.out_dir / "vocab.json", args.out_dir / "merges.txt") if path.exists()]
    if existing and not args.overwrite:
        parser.error(f"{args.out_dir} already holds {' and '.join(p.name for p in existing)}; "
                     "choose another out_dir, or pass --overwrite")
    vocab, merges = build_vocab(read_bpe_lines(args.source))
    assert len(vocab) == 49408, len(vocab)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
    (args.out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out_dir}")


if __name__ == "__main__":
    main()
