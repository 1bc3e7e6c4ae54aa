"""A tiny CLIP-style byte-level BPE tokenizer built offline, for tests and the quickstart model.

It has the same format as the real CLIP tokenizer (byte-level base alphabet, ``</w>`` word ends,
``<|startoftext|>``/``<|endoftext|>`` last in the vocabulary) but its merges are learned from a
small built-in word list, so it needs no download.
"""

from __future__ import annotations

from collections import Counter

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPTokenizer, T5TokenizerFast

_WORDS = (
    "a an the of and with in on at photo picture painting drawing image portrait close up of "
    "sks ohwx dog cat person man woman girl boy style art red green blue yellow white black "
    "orange purple pink brown grey square circle stripe stripes pattern background colorful "
    "bright dark high quality best worst low blurry detailed simple cute small large tree house "
    "sky sea mountain city street flower flowers face hands sitting standing running lying "
    "1girl 1boy solo looking at viewer smile masterpiece"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (CLIP uses the same)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _learn_merges(words: list[str], max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken alphabetically)."""
    byte_map = _bytes_to_unicode()
    corpus = Counter()
    for word in words:
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        corpus[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        corpus = merged
    return merges


def build_tiny_clip_tokenizer(max_merges: int = 400, model_max_length: int = 77):
    """Return a ``CLIPTokenizer`` with a small learned vocabulary (about 900 entries)."""
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges = _learn_merges(list(_WORDS), max_merges)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_tiny_t5_tokenizer(vocab_size: int = 200):
    """A tiny T5-style (Unigram, ``</s>`` appended) tokenizer trained on the built-in word list."""

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator([" ".join(_WORDS)] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
