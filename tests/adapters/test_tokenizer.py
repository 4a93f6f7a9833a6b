import pytest

from adapters.tokenizer import Tokenizer, TokenizerError, train_byte_bpe, write_tiktoken_bpe

TEXTS = ["What colour is the square? The square is red.", "How many circles are there? There are 3 circles."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    write_tiktoken_bpe(train_byte_bpe(TEXTS * 10, n_merges=20), path)
    return Tokenizer(path)


def test_special_token_ids_follow_llama3(tok):
    assert tok.n_base == 256 + 20 and tok.n_words == tok.n_base + 256
    assert tok.bos_id == tok.n_base and tok.eos_id == tok.n_base + 1
    assert tok.start_header_id == tok.n_base + 6 and tok.end_header_id == tok.n_base + 7
    assert tok.eom_id == tok.n_base + 8 and tok.eot_id == tok.n_base + 9 and tok.image_id == tok.n_base + 11
    assert tok.special["<|reserved_special_token_245|>"] == tok.n_words - 1


def test_round_trip_and_merges(tok):
    text = "The square is red. Ünïcode ✓ and digits 12345"
    ids = tok.encode(text, bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges are used


def test_special_tokens_in_plain_text_are_not_parsed(tok):
    assert tok.image_id not in tok.encode("<|image|>")
    assert tok.encode("<|image|>", allow_special=True) == [tok.image_id]


def test_bad_file(tmp_path):
    with pytest.raises(TokenizerError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_text("not base64 !!\n")
    with pytest.raises(TokenizerError, match="bad.model"):
        Tokenizer(bad)
