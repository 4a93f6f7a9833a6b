"""common.jsonl: every problem names file:line, through the caller's own exception class."""

import pytest

from common.jsonl import read_jsonl


class MyError(ValueError):
    pass


def test_rows_with_line_numbers_blank_lines_skipped(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes('\ufeff{"id": "x"}\n\n  \n{"id": "y"}\n'.encode())
    assert list(read_jsonl(f, MyError)) == [(1, {"id": "x"}), (4, {"id": "y"})]


@pytest.mark.parametrize("content, message", [
    (b'{"id": 1}\n{oops\n', r"a.jsonl:2: not valid JSON \(Expecting property name"),
    (b'[1, 2]\n', r"a.jsonl:1: expected a JSON object, got list"),
    (b'{"id": "\xe9"}\n', r"questions file .*a.jsonl is not UTF-8 \(byte offset 8\)"),
])
def test_bad_content_is_named(tmp_path, content, message):
    f = tmp_path / "a.jsonl"
    f.write_bytes(content)
    with pytest.raises(MyError, match=message):
        list(read_jsonl(f, MyError, what="questions file"))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MyError, match=r"answer key not found: .*nope.jsonl"):
        list(read_jsonl(tmp_path / "nope.jsonl", MyError, what="answer key"))
    with pytest.raises(MyError, match="is a folder"):
        list(read_jsonl(tmp_path, MyError))
