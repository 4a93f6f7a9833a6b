"""espeak-ng spoken digits: deterministic in the seed, speech of the text, a named error without espeak-ng."""

import numpy as np
import pytest

from synthetic import digits
from tests.system_deps import require_binary


def test_synthesized_digits_are_speech_of_the_text(tmp_path):
    require_binary("espeak-ng")
    utts = digits.synthesize_digits(4, seed=3, out_dir=tmp_path, workers=2)
    again = digits.synthesize_digits(4, seed=3, workers=2)
    assert [u.text for u in utts] == [u.text for u in again]  # a seed fixes texts, voices, speed, pitch
    for u in utts:
        words = u.text.split()
        assert 3 <= len(words) <= 5 and set(words) <= set(digits.DIGITS)
        assert u.voice in digits.VOICES and digits.SPEED_WPM[0] <= u.speed <= digits.SPEED_WPM[1]
        assert u.samples.dtype == np.float32 and 0.8 < u.duration_s < 6
        assert np.abs(u.samples).max() > 0.05  # not silence
    assert len(list(tmp_path.glob("*.wav"))) == 4
    assert [u.text for u in digits.synthesize_digits(4, seed=4, workers=2)] != [u.text for u in utts]


def test_missing_espeak_is_a_named_error(monkeypatch):
    monkeypatch.setattr(digits.shutil, "which", lambda name: None)
    with pytest.raises(digits.EspeakError, match="apt-get install espeak-ng"):
        digits.synthesize_digits(1, seed=0)
