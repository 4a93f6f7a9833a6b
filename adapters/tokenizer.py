"""The Llama 3 tokenizer: tiktoken BPE (``tokenizer.model``) plus 256 special tokens.

Special token ids follow Meta's Llama 3.2 tokenizer: ``<|begin_of_text|>`` = n_base, ..., ``<|image|>`` =
n_base + 11 (128011 for the real 128,000-token BPE). The multimodal model feeds ``<|image|>`` as id
``vocab_size`` (128256, the first learnable embedding row), as the released code does.
"""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

# The regex Meta ships with Llama 3 (tokenizer.py in llama-models).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read; the message names the file."""


def special_tokens(n_base: int) -> dict[str, int]:
    names = NAMED_SPECIAL_TOKENS + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
    ]
    return {name: n_base + i for i, name in enumerate(names)}


class Tokenizer:
    """Encode/decode text with the Llama 3 BPE; ``n_words`` = base ranks + 256 special tokens."""

    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer.model not found")
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: not a tiktoken BPE file ({e})") from e
        self.path = path
        self.n_base = len(ranks)
        self.special = special_tokens(self.n_base)
        self.model = tiktoken.Encoding(
            name=path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special
        )
        self.n_words = self.n_base + len(self.special)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.eot_id = self.special["<|eot_id|>"]
        self.eom_id = self.special["<|eom_id|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]
        self.image_id = self.special["<|image|>"]
        self.start_header_id = self.special["<|start_header_id|>"]
        self.end_header_id = self.special["<|end_header_id|>"]
        self.stop_ids = {self.eot_id, self.eom_id, self.eos_id}

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Plain text is never parsed for special tokens unless ``allow_special`` (prompt-injection safe)."""
        ids = self.model.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.model.decode([i for i in ids if 0 <= i < self.n_words])

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Bytes of the ids, for streaming (a character may span tokens)."""
        return self.model.decode_bytes([i for i in ids if 0 <= i < self.n_words])


def train_byte_bpe(texts: list[str], n_merges: int) -> dict[bytes, int]:
    """A small byte-level BPE (256 byte ranks + ``n_merges`` merges) for tiny test/demo models.

    Pre-tokenised with the Llama 3 regex, so the result behaves like a (very) small Llama 3 BPE.
    """
    import regex

    words = Counter()
    for t in texts:
        for piece in regex.findall(PAT_STR, t):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < 256 + n_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        ranks.setdefault(merged, len(ranks))  # two merge paths can spell the same bytes
        new_words = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return ranks


def write_tiktoken_bpe(ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write ranks in tiktoken's ``tokenizer.model`` format (base64 token, space, rank)."""
    path = Path(path)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_tiny_tokenizer(out_dir: str | Path, texts: list[str], n_merges: int = 120) -> Tokenizer:
    """A byte-level BPE trained on ``texts`` (a task's questions, answers and chat roles), written as
    ``out_dir/tokenizer.model`` in the real tiktoken format: the tokenizer of the tiny synthetic-task LMs."""
    if not texts:
        raise ValueError(f"build_tiny_tokenizer({out_dir}): no texts to train the BPE on")
    path = Path(out_dir) / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Repeated so every string's merges outrank the single-occurrence byte pairs of the others.
    write_tiktoken_bpe(train_byte_bpe(texts * 4, n_merges), path)
    return Tokenizer(path)
