"""The spoken-digits LM's text-only ASR dialogs: shards the text kind reads, noise that never reads as a digit."""

import json
from pathlib import Path

import pytest

from adapters.chat import IGNORE_INDEX
from adapters.tokenizer import build_tiny_tokenizer
from media.tar import read_tar
from scripts import make_synthetic
from speech.adapter import asr_prompt
from synthetic.dialogs import write_asr_dialogs
from synthetic.digits import DIGITS
from synthetic.tasks import SyntheticTaskError
from tests.system_deps import require_binary
from training.data import RawSample
from training.text_lm import TextCodec


def _samples(shards: list[str]) -> list[RawSample]:
    return [RawSample(s, key, members, 0, i) for s in shards for i, (key, members) in enumerate(read_tar(Path(s)))]


def test_dialogs_are_text_kind_samples_whose_user_turn_repeats_the_answer_amid_noise(tmp_path):
    written = write_asr_dialogs(tmp_path / "lm", 50, seed=0, system=asr_prompt(), per_shard=20)
    assert written["dialogs"] == 50 and len(written["shards"]) == 3
    tok = build_tiny_tokenizer(tmp_path, [" ".join(DIGITS), *DIGITS, "system", "user", "assistant", asr_prompt()])
    codec = TextCodec(tok, "conversation")
    digit_ids = {i for w in DIGITS for i in (*tok.encode(w), *tok.encode(" " + w))}
    samples = _samples(written["shards"])
    assert len(samples) == 50
    noisy = repeated = 0
    for raw in samples:
        system, user, answer = (m["content"] for m in json.loads(raw.members["json"])["meta"]["conversations"])
        assert system == asr_prompt() and 3 <= len(answer.split()) <= 5
        ex = codec.decode(raw)
        assert [t for t, y in zip(ex.tokens, ex.labels) if y != IGNORE_INDEX] == [*tok.encode(answer), tok.eot_id]
        # Runs of one digit word (noise between answer words) are the answer, and the user turn's digit
        # tokens are exactly its digit words: noise never tokenizes into a digit.
        words = user.split()
        runs = [w for i, w in enumerate(words) if w in DIGITS and (i == 0 or words[i - 1] != w)]
        assert runs == answer.split(), (user, answer)
        spoken = [w for w in words if w in DIGITS]
        assert tok.decode([t for t in tok.encode(user) if t in digit_ids]).split() == spoken, user
        noisy += len(spoken) < len(words)
        repeated += len(spoken) > len(runs)
    assert noisy > 40 and repeated > 40  # filler words around the digits, and digits spanning several words


def test_dialogs_are_deterministic_and_refuse_a_used_dir(tmp_path):
    a = write_asr_dialogs(tmp_path / "a", 5, seed=1, system="S")["shards"]
    b = write_asr_dialogs(tmp_path / "b", 5, seed=1, system="S")["shards"]
    c = write_asr_dialogs(tmp_path / "c", 5, seed=2, system="S")["shards"]
    assert Path(a[0]).read_bytes() == Path(b[0]).read_bytes() != Path(c[0]).read_bytes()
    with pytest.raises(SyntheticTaskError, match="already exists and is not empty"):
        write_asr_dialogs(tmp_path / "a", 5, seed=1, system="S")
    with pytest.raises(SyntheticTaskError, match="must be >= 1"):
        write_asr_dialogs(tmp_path / "d", 0, seed=1, system="S")


def test_make_synthetic_spoken_digits_writes_the_lm_dialogs(tmp_path, capsys):
    assert make_synthetic.main(["spoken-digits", str(tmp_path / "bad"), "--n-train", "1", "--n-test", "1",
                                "--seed", "0", "--n-lm-dialogs", "0"]) == 2
    assert "--n-lm-dialogs: 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    require_binary("espeak-ng")
    assert make_synthetic.main(["spoken-digits", str(tmp_path / "out"), "--n-train", "1", "--n-test", "1",
                                "--seed", "0", "--n-lm-dialogs", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lm_dialogs"] == {"dialogs": 3, "shards": [str(tmp_path / "out" / "lm" / "shard_00000.tar")]}
    messages = json.loads(_samples(result["lm_dialogs"]["shards"])[0].members["json"])["meta"]["conversations"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
