"""Text-only ASR dialogs for the spoken-digits task: what the tiny LM pre-trains on before it is frozen.

    write_asr_dialogs("out/spoken-digits/lm", n=16000, seed=0, system="Repeat after me in English:")

writes webdataset shards ``shard_NNNNN.tar`` of ``key.json`` = ``{"meta": {"conversations": [system,
user, assistant]}}``, the ``data.format: conversation`` input of the trainer's ``text`` kind. The assistant
turn is a random 3-5 digit string ("three one four"); the user turn holds the same digits as words, each repeated
1-``max_repeat`` times, with 0-``max_noise`` random non-digit words before the first and between them
("qx one one zt three three three b four"). That is what the speech adapter's audio positions will look like
to the frozen LM: a run of positions per spoken word with filler in between. An LM pre-trained on clean
copies (one word each, no noise) is one the adapter struggles to drive: held-out WER 0.67 against 0.11
(the in-process recipe this replaces, 400 adapter steps, seed 0).

Noise words are 1-2 random lowercase letters, never a digit word, each after a space: the BPE's
pre-tokenizer splits at spaces, so a noise word never merges with a digit word, whose tokens stay those of
``" " + word`` whatever tokenizer reads the text. Deterministic in ``seed``.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import webdataset as wds

from synthetic.digits import DIGITS, random_digit_string
from synthetic.tasks import SyntheticTaskError, _fresh_dir

MAX_NOISE = 3  # noise words before the first digit word and after each
MAX_REPEAT = 4  # times a digit word may repeat (a spoken word spans several audio positions)
PER_SHARD = 2000


def noise_word(rng: random.Random) -> str:
    """1-2 random lowercase letters that are not a digit word."""
    while True:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 2)))
        if word not in DIGITS:
            return word


def noisy_copy(digits: str, rng: random.Random, max_noise: int = MAX_NOISE, max_repeat: int = MAX_REPEAT) -> str:
    """The user turn: each word of ``digits`` repeated 1..max_repeat times, noise words around them (at least
    one between two digit words when words repeat, else "one one" would be ambiguous)."""
    gap = 1 if max_repeat > 1 else 0
    words = [noise_word(rng) for _ in range(rng.randint(0, max_noise))]
    for w in digits.split():
        words += [w] * rng.randint(1, max_repeat)
        words += [noise_word(rng) for _ in range(rng.randint(gap, max(gap, max_noise)))]
    return " ".join(words)


def asr_dialog(system: str, rng: random.Random) -> list[dict]:
    digits = random_digit_string(rng)
    return [{"role": "system", "content": system}, {"role": "user", "content": noisy_copy(digits, rng)},
            {"role": "assistant", "content": digits}]


def write_asr_dialogs(out: str | Path, n: int, seed: int, system: str, per_shard: int = PER_SHARD) -> dict:
    """``n`` dialogs (`asr_dialog`, ``system`` as the system turn) in shards of ``per_shard`` under ``out``
    (new or empty, else `SyntheticTaskError`). Returns ``{"dialogs": n, "shards": [paths]}``."""
    if n < 1 or per_shard < 1:
        raise SyntheticTaskError(f"{out}: dialogs ({n}) and dialogs per shard ({per_shard}) must be >= 1")
    out = _fresh_dir(Path(out))
    rng = random.Random(f"asr-dialogs/{seed}")  # its own stream: the audio's digit strings are not these
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = out / f"shard_{s:05d}.tar"
        with wds.TarWriter(str(path), mtime=0.0) as w:
            for i in range(start, min(n, start + per_shard)):
                w.write({"__key__": f"{i:06d}", "json": {"meta": {"conversations": asr_dialog(system, rng)}}})
        shards.append(str(path))
    return {"dialogs": n, "shards": shards}
