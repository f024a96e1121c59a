"""A token stream with positions, shared by the polynomial and the network-spec parsers."""

from __future__ import annotations

import re
from typing import NoReturn

Token = tuple[str, str, int]  # (kind, text, position)


class TokenStream:
    """Splits text into named-group tokens and reports errors with their position.

    Args:
        text: The text to parse.
        pattern: A regex of named groups, each alternative allowing leading whitespace.
        what: What is parsed, for error messages ("polynomial", "network spec").
        unknown: Advice appended when a character matches no token.
        hint: Advice appended to every error (e.g. an example).

    """

    def __init__(
        self, text: str, pattern: re.Pattern[str], what: str, unknown: str = "", hint: str = ""
    ) -> None:
        self.text, self.what, self.hint = text, what, hint
        self.tokens: list[Token] = []
        self.i = 0
        pos = 0
        while text[pos:].strip():
            m = pattern.match(text, pos)
            if m is None:
                col = len(text) - len(text[pos:].lstrip())
                self.fail(col, f"unknown token {text[col]!r}{unknown}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()

    def fail(self, pos: int, problem: str) -> NoReturn:
        """Raise a ValueError naming the position and the problem."""
        raise ValueError(f"bad {self.what} {self.text!r} at position {pos}: {problem}{self.hint}")

    def peek(self) -> Token:
        """The next token without consuming it; ``("end", "", len(text))`` at the end."""
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "", len(self.text))

    def take(self) -> Token:
        """Consume and return the next token."""
        tok = self.peek()
        self.i += 1
        return tok
