"""Tokenizers: one wrapper around an HF `tokenizers.Tokenizer`, whatever its origin.

    tokenizer_type          --tokenizer-model       what it is
    EmbeddedTokenizer       (none)                  ours: byte-level BPE, 1024 ids, in assets/
    HuggingFaceTokenizer    path to tokenizer.json  any local HF `tokenizers` file (never the hub)
    TokenizerFile           path to tokenizer.json  alias of HuggingFaceTokenizer
    ByteTokenizer           (none)                  id = byte value (0..255), then the 4 specials

Every type is held as an HF `tokenizers.Tokenizer`, so `hf_tokenizer_json()` always exports a file
that `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` loads (used by checkpoint export).

The embedded tokenizer is trained here, deterministically, on `generate_corpus(4000, seed=0)`:
specials `<eod> <pad> <think> </think>` take ids 0-3, the 256 byte symbols come next, merges fill
the rest up to 1024. Its pre-tokenizer is GPT-2's regex except that a number is split into single
digits (a leading space stays on the first digit), so "17 + 25 = 42" is arithmetic the model can
learn digit by digit rather than memorised multi-digit tokens. Regenerate the shipped file with

    python -m megatron_rlp.data.tokenizer --regenerate

`vocab_size` is the true number of ids; the model builder pads the embedding itself.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import OrderedDict
from typing import Iterable, Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_rlp.data.corpus import THINK_END, THINK_START, generate_corpus

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
EMBEDDED_TOKENIZER_PATH = os.path.join(ASSETS_DIR, "tokenizer.json")

EOD, PAD = "<eod>", "<pad>"
SPECIAL_TOKENS = (EOD, PAD, THINK_START, THINK_END)

EMBEDDED_VOCAB_SIZE = 1024
EMBEDDED_TRAIN_DOCS = 4000
EMBEDDED_TRAIN_SEED = 0
# GPT-2's split pattern with \p{N}+ narrowed to one digit.
_SPLIT_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

TOKENIZER_TYPES = ("EmbeddedTokenizer", "HuggingFaceTokenizer", "TokenizerFile", "ByteTokenizer")

# Names a foreign tokenizer.json may use for end-of-document and padding, in order of preference.
_EOD_CANDIDATES = (EOD, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
_PAD_CANDIDATES = (PAD, "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class RLPTokenizer:
    """The interface the rest of megatron-rlp uses. Wraps an HF `tokenizers.Tokenizer`.

    `eod` must exist (`ValueError` on first use otherwise); `pad` falls back to `eod`;
    `think_start` / `think_end` are None when the vocabulary has no `<think>` / `</think>`.
    """

    def __init__(self, tokenizer: Tokenizer, tokenizer_type: str, source: str):
        self._tok = tokenizer
        self.tokenizer_type = tokenizer_type
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Max id + 1, not len(vocab): a foreign file may leave holes in its id range.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._eod = next((vocab[t] for t in _EOD_CANDIDATES if t in vocab), None)
        pad = next((vocab[t] for t in _PAD_CANDIDATES if t in vocab), None)
        self.pad = pad if pad is not None else self._eod
        self.think_start = vocab.get(THINK_START)
        self.think_end = vocab.get(THINK_END)
        digest = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
        # megatron-core hashes the dataset config, tokenizer included, via `unique_identifiers`
        # to name its cached sample indices: changing the tokenizer must change that name.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_type", tokenizer_type),
             ("sha256", digest)]
        )

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ValueError(
                f"tokenizer {self.source!r} has no end-of-document token (looked for "
                f"{', '.join(_EOD_CANDIDATES)}); add one as a special token to the tokenizer.json"
            )
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))

    def hf_tokenizer_json(self) -> str:
        return self._tok.to_str()

    # megatron-core's MegatronTokenizer spelling, for code written against it.
    tokenize = encode
    detokenize = decode

    @property
    def hf_tokenizer(self) -> Tokenizer:
        return self._tok

    def __repr__(self) -> str:
        return f"RLPTokenizer(type={self.tokenizer_type}, source={self.source!r}, " \
               f"vocab_size={self.vocab_size})"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _embedded_pipeline(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_embedded_tokenizer(num_docs: int = EMBEDDED_TRAIN_DOCS,
                             seed: int = EMBEDDED_TRAIN_SEED,
                             vocab_size: int = EMBEDDED_VOCAB_SIZE) -> Tokenizer:
    """Train the embedded BPE from the generated corpus. Same arguments → same tokenizer.

    HF's BPE trainer is deterministic for a fixed input: the alphabet is sorted, and merges are
    taken by (count, pair ids), so ties never depend on hash order. test_tokenizer checks that the
    result equals the shipped file.
    """
    tok = _embedded_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator((d["text"] for d in generate_corpus(num_docs, seed)), trainer)
    return tok


def regenerate_embedded_tokenizer(path: str = EMBEDDED_TOKENIZER_PATH) -> str:
    """Retrain the embedded tokenizer and write it to `path` atomically; returns the path."""
    text = train_embedded_tokenizer().to_str(pretty=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    return path


def _byte_tokenizer() -> Tokenizer:
    """A BPE with no merges over the byte alphabet, ids arranged so id == byte value."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids 256..259
    return tok


def build_tokenizer(tokenizer_type: str = "EmbeddedTokenizer",
                    tokenizer_model: Optional[str] = None) -> RLPTokenizer:
    """Build a tokenizer by Megatron-style `--tokenizer-type` / `--tokenizer-model`."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; valid types: "
            f"{', '.join(TOKENIZER_TYPES)}"
        )
    if tokenizer_type in ("HuggingFaceTokenizer", "TokenizerFile"):
        if not tokenizer_model:
            raise ValueError(
                f"--tokenizer-type {tokenizer_type} needs --tokenizer-model pointing to a local "
                f"tokenizer.json (hub names are not fetched)"
            )
        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--tokenizer-model {tokenizer_model!r}: no such file; give the path of a local "
                f"HF tokenizer.json (or a folder containing one); nothing is downloaded"
            )
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"--tokenizer-model {path!r} is not a valid HF tokenizer.json: {e}")
        return RLPTokenizer(tok, tokenizer_type, os.path.abspath(path))
    if tokenizer_model:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type} is built in and takes no --tokenizer-model "
            f"(got {tokenizer_model!r}); use --tokenizer-type HuggingFaceTokenizer for a file"
        )
    if tokenizer_type == "ByteTokenizer":
        return RLPTokenizer(_byte_tokenizer(), tokenizer_type, "bytes")
    if not os.path.isfile(EMBEDDED_TOKENIZER_PATH):
        raise FileNotFoundError(
            f"the embedded tokenizer {EMBEDDED_TOKENIZER_PATH} is missing from the install; "
            f"recreate it with: python -m megatron_rlp.data.tokenizer --regenerate"
        )
    return RLPTokenizer(Tokenizer.from_file(EMBEDDED_TOKENIZER_PATH), tokenizer_type, "embedded")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Embedded tokenizer maintenance.")
    parser.add_argument("--regenerate", action="store_true",
                        help=f"retrain the embedded BPE and write {EMBEDDED_TOKENIZER_PATH}")
    parser.add_argument("--output", default=EMBEDDED_TOKENIZER_PATH, help="where to write it")
    args = parser.parse_args(argv)
    if not args.regenerate:
        parser.error("nothing to do: pass --regenerate")
    path = regenerate_embedded_tokenizer(args.output)
    tok = build_tokenizer("HuggingFaceTokenizer", path)
    print(json.dumps({"path": path, "vocab_size": tok.vocab_size,
                      "sha256": tok.unique_identifiers["sha256"]}))


if __name__ == "__main__":
    main()
