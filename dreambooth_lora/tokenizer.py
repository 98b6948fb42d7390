"""A CLIP byte-level BPE tokenizer built in code from a word list, so no hub download is needed."""

from __future__ import annotations

from transformers import CLIPTokenizer

# Rare identifier tokens people use in DreamBooth prompts; they get whole-word tokens so that
# training one token's embedding touches no other word.
RARE_TOKENS = ("sks", "zwx", "ohwx", "qlx", "vzt", "bnha", "xjy")

BASE_WORDS = (
    "a an the of on in at with and photo picture image background dog cat person man woman "
    "face mug toy car house tree snow beach moon city street forest red green blue yellow "
    "white black gray grey orange purple pink brown cyan magenta big small"
).split()

MODEL_MAX_LENGTH = 77  # CLIP's context length, kept so prompts behave like SD's


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Train byte-pair merges on `words` until each word is a single token (plain BPE training)."""
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    segmented = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted({w.lower() for w in words if w.strip()})]
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        # Most frequent pair first, ties broken by the pair itself so the result is deterministic.
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(" ".join(best))
        vocab_list.append("".join(best))
        segmented = [_merge_pair(symbols, best) for symbols in segmented]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab_list)}, merges


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def build_tokenizer(words: list[str] | tuple[str, ...] = ()) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary covers BASE_WORDS, RARE_TOKENS and `words`."""
    vocab, merges = build_vocab_and_merges(list(BASE_WORDS) + list(RARE_TOKENS) + list(words))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI CLIP's merges, shipped as data in open-clip-torch (MIT)
CLIP_VOCAB_SIZE = 49408  # 256 bytes x 2 + 48894 merges + 2 special tokens: the vocabulary of SD 1.x's tokenizer


def clip_bpe_path():
    """Where open-clip-torch's copy of CLIP's merges lies, found without importing open_clip; None if absent."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / CLIP_BPE_FILE).exists():
            return Path(folder) / CLIP_BPE_FILE
    return None


def build_clip_tokenizer() -> CLIPTokenizer | None:
    """SD 1.x's CLIP tokenizer (same vocabulary and merges) from open-clip-torch's data file; None when absent."""
    import gzip

    path = clip_bpe_path()
    if path is None:
        return None
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_VOCAB_SIZE - 256 * 2 - 2 + 1]]  # line 0 is a header
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab_list)}, merges=merges)
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer
