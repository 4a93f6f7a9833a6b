"""The strings the speech tests' tiny tokenizer is trained on (a test helper: speech/ must not import the
synthetic tasks, which sit above it)."""

from speech.adapter import asr_prompt
from synthetic.digits import DIGITS

FILLERS = ("uh", "um", "er")  # a few non-digit whole words


def asr_corpus_text() -> list[str]:
    """The chat roles, the ASR prompt, the digit words and a few fillers."""
    return ["system", "user", "assistant", "\n\n", asr_prompt("English"), " ".join(DIGITS), *DIGITS,
            " ".join(FILLERS * 4), *FILLERS]
