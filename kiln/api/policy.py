"""The operator's prompt filter: words, phrases and regular expressions in a file, one per line.

The file (setting ``prompt_filter_file``) is read and checked at start-up; a bad line stops start-up
with its line number. Blank lines and lines starting with ``#`` are skipped. Each other line is:

- ``word:TEXT`` or a plain line: a word or phrase, matched as whole words. ``ass`` refuses "ass"
  and "ASS!" but not "a class photo"; ``bad thing`` refuses "bad thing", "Bad-Thing" and
  "bad_thing" (its words, separated by anything that is not a letter or digit). In a script written
  without spaces between words (Chinese, Japanese, Thai) use ``re:``.
- ``re:PATTERN``: a Python regular expression, matched case-insensitively anywhere in the text.
- A plain line with any of the characters ``. ^ $ * + ? { } [ ] \\ | ( )`` is read as a regular
  expression, as every line was before words existed, so older files keep their meaning; write
  ``word:`` before a word or phrase that contains one of them (``word:st. louis``).

Both the entries and the texts are compared after Unicode NFKC normalisation (full-width and other
compatibility letters read as their plain forms: ``ｂａｄ`` is ``bad``) with invisible format
characters removed (zero-width spaces and joiners, soft hyphens); words are also casefolded.
A prompt or negative prompt that matches any entry is refused with 403 ``prompt_filtered``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import PromptFiltered
from kiln.settings import SettingsError

REGEX_CHARS = frozenset(".^$*+?{}[]\\|()")
# a letter or digit on the other side means the match is part of a longer word
BEFORE, AFTER = r"(?<![^\W_])", r"(?![^\W_])"
SEPARATOR = r"[\W_]+"


@dataclass(frozen=True)
class Entry:
    """One line of the file: a regular expression, or a word or phrase."""

    kind: str  # "regex" | "word"
    text: str


def normalised(text: str) -> str:
    """``text`` in NFKC with format characters (Unicode category Cf: zero-width, soft hyphen) removed."""
    return "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")


def parse_line(line: str) -> Entry | None:
    """The entry a line of the file holds; None for a blank line or a comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("re:"):
        return Entry("regex", text[3:].strip())
    if text.startswith("word:"):
        return Entry("word", text[5:].strip())
    return Entry("regex" if REGEX_CHARS & set(text) else "word", text)


def word_pattern(entry: str) -> str:
    """A regular expression for ``entry`` as whole words, its words joined by any separator; ``""``
    when it has no letter or digit."""
    words = [w for w in re.split(SEPARATOR, normalised(entry).casefold()) if w]
    return f"{BEFORE}{SEPARATOR.join(re.escape(w) for w in words)}{AFTER}" if words else ""


class PromptFilter:
    """Refuses texts that contain one of ``words`` (words or phrases) or match one of ``patterns``."""

    def __init__(self, patterns: Sequence[str] = (), words: Sequence[str] = ()) -> None:
        self.patterns = [re.compile(normalised(p), re.IGNORECASE) for p in patterns]
        alternatives = [w for w in (word_pattern(word) for word in words) if w]
        self.words = re.compile("|".join(alternatives)) if alternatives else None

    @classmethod
    def from_file(cls, path: Path | None) -> PromptFilter:
        if path is None:
            return cls()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(f"prompt_filter_file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise SettingsError(f"prompt_filter_file {path}: not UTF-8 text ({exc.reason})") from exc
        patterns: list[str] = []
        words: list[str] = []
        for number, line in enumerate(lines, 1):
            entry = parse_line(line)
            if entry is None:
                continue
            where = f"prompt_filter_file {path}, line {number}"
            if entry.kind == "word":
                if not word_pattern(entry.text):
                    raise SettingsError(f"{where} ({line.strip()!r}): a word or phrase needs a letter or digit")
                words.append(entry.text)
                continue
            if not entry.text:
                raise SettingsError(f"{where}: re: needs a pattern after it")
            try:
                re.compile(normalised(entry.text))
            except re.error as exc:
                raise SettingsError(f"{where}: pattern {len(patterns) + 1} ({entry.text!r}): {exc}") from exc
            patterns.append(entry.text)
        return cls(patterns, words)

    def check(self, *texts: str | None) -> None:
        """:class:`PromptFiltered` when one of ``texts`` (prompt, negative prompt) holds a refused entry."""
        if not self.patterns and self.words is None:
            return
        for text in texts:
            if not text:
                continue
            plain = normalised(text)
            folded = plain.casefold()
            if (self.words is not None and self.words.search(folded)) or any(p.search(plain) for p in self.patterns):
                raise PromptFiltered("the prompt was refused by this server's content policy")
