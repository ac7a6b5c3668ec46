"""The operator's prompt filter: regular expressions, one per line, matched case-insensitively.

Blank lines and lines starting with ``#`` are skipped. A prompt (or negative prompt) that matches
any expression is refused with 403 ``prompt_filtered``.
"""

from __future__ import annotations

import re
from pathlib import Path

from kiln.errors import PromptFiltered
from kiln.settings import SettingsError


class PromptFilter:
    def __init__(self, patterns: list[str]) -> None:
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    @classmethod
    def from_file(cls, path: Path | None) -> PromptFilter:
        if path is None:
            return cls([])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(f"prompt_filter_file {path}: {exc.strerror}") from exc
        patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        for number, pattern in enumerate(patterns, 1):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SettingsError(f"prompt_filter_file {path}: pattern {number} ({pattern!r}): {exc}") from exc
        return cls(patterns)

    def check(self, *texts: str | None) -> None:
        for text in texts:
            if text and any(p.search(text) for p in self.patterns):
                raise PromptFiltered("the prompt was refused by this server's content policy")
