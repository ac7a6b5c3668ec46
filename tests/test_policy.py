"""The operator's prompt filter file: words and phrases on word boundaries after NFKC and casefolding,
regular expressions (``re:`` or, as older files wrote them, bare), and its checks at start-up."""

from __future__ import annotations

import pytest

from kiln.api.policy import PromptFilter
from kiln.errors import PromptFiltered
from kiln.settings import SettingsError

FILE = """\
# refused words and phrases
ass
bad thing
word:st. louis
re:\\bforbid+en\\b
\\bcolou?rful\\b
"""


@pytest.fixture
def rules(tmp_path) -> PromptFilter:
    path = tmp_path / "filter.txt"
    path.write_text(FILE, encoding="utf-8")
    return PromptFilter.from_file(path)


def refused(rules: PromptFilter, text: str) -> bool:
    try:
        rules.check(text)
    except PromptFiltered as exc:
        assert exc.code == "prompt_filtered" and "content policy" in exc.message
        return True
    return False


@pytest.mark.parametrize(("text", "expected"), [
    # a word is refused where it stands alone, never inside another word
    ("ass", True),
    ("a wild ass, grazing", True),
    ("(ass)", True),
    ("ass_hat", True),  # an underscore separates words as a space does
    ("a class photo", False),
    ("an assistant", False),
    ("passing by", False),
    ("bass2", False),
    # casefolded, and NFKC-normalised: full-width and other compatibility forms are their plain letters
    ("ASS", True),
    ("Ａｓｓ", True),
    ("ａ ｃｌａｓｓ ｐｈｏｔｏ", False),
    ("a\u200bss", True),  # a zero-width space hides nothing
    # a phrase: its words in order, separated by anything that is not a letter or digit
    ("a bad thing happened", True),
    ("BAD   THING", True),
    ("bad-thing", True),
    ("ｂａｄ\u3000ｔｈｉｎｇ", True),  # full-width letters and an ideographic space
    ("a bad day, a good thing", False),
    ("badthing", False),
    ("bad things", False),
    # word: takes characters a bare line would read as a regular expression
    ("off to St. Louis", True),
    ("st-louis", True),
    ("east louisiana", False),
    # regular expressions: re: and bare lines with regex characters (older files), anywhere, any case
    ("it is FORBIDDDEN here", True),
    ("forbidden", True),
    ("forbiddenly", False),
    ("a colorful scene", True),
    ("a ｃｏｌｏｕｒｆｕｌ scene", True),  # regexes see the NFKC text too
    ("a red circle on a blue background", False),
])
def test_words_phrases_and_patterns(rules, text, expected):
    assert refused(rules, text) is expected


def test_the_negative_prompt_is_checked_too(rules):
    rules.check("a red circle", None, "")
    with pytest.raises(PromptFiltered):
        rules.check("a red circle", "no bad thing")


def test_no_file_refuses_nothing():
    PromptFilter.from_file(None).check("ass", "bad thing")


@pytest.mark.parametrize(("content", "words"), [
    ("ok\n(unclosed\n", "line 2: pattern 1 ('(unclosed')"),
    ("re:\n", "line 1: re: needs a pattern"),
    ("re:[a-\n", "line 1: pattern 1"),
    ("# punctuation only\n!!!\n", "line 2 ('!!!'): a word or phrase needs a letter or digit"),
    ("word:...\n", "line 1"),
])
def test_a_bad_line_stops_start_up_naming_it(tmp_path, content, words):
    path = tmp_path / "filter.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        PromptFilter.from_file(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_an_unreadable_file_stops_start_up(tmp_path):
    with pytest.raises(SettingsError, match="missing.txt"):
        PromptFilter.from_file(tmp_path / "missing.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SettingsError, match="not UTF-8"):
        PromptFilter.from_file(latin)
