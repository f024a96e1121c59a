"""Network specs as data: which PolyInception units fill stages A, B and C.

Grammar (whitespace is free)::

    spec  := stage ('|' stage)*                      stages A, B, C, each once, in that order
    stage := ('A' | 'B' | 'C') ':' seq
    seq   := item ((',' | '->') item)*               units in order, bottom to top
    item  := (unit | '(' seq ')') ('x' N)?           'x N' repeats the item N times
    unit  := module | '[' polynomial ']'             module: ir, k-way, poly-k, mpoly-k

Examples::

    A: ir x3 | B: ir x6 | C: ir x3                                  IR 3-6-3
    A: 2-way x10 | B: (poly-3, 2-way) x10 | C: (poly-3, 2-way) x5   Very Deep PolyNet
    A: ir x6 | B: (3-way -> mpoly-3 -> poly-3) x4 | C: ir x6        the paper's mixed 6-12-6
    A: [I + F + GF] x2 | B: ir | C: ir                              any polynomial as a unit
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from polynet.model._tokens import TokenStream
from polynet.model.algebra import parse as parse_polynomial
from polynet.model.modules import resolve_expression

STAGES = ("A", "B", "C")

_TOKEN = re.compile(
    r"\s*(?:(?P<poly>\[[^\]]*\])|(?P<repeat>[x×]\s*\d+)|(?P<arrow>->)"
    r"|(?P<punct>[|:,()])|(?P<name>[A-Za-z0-9]+(?:-(?!>)[A-Za-z0-9]+)*))"
)


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (A, B or C, which picks the IR-A/B/C block) and its units in order.

    Attributes:
        name: ``"A"``, ``"B"`` or ``"C"``.
        units: Module names (``"2-way"``) or bracketed polynomials (``"[I + F + GF]"``).

    """

    name: str
    units: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.name not in STAGES:
            raise ValueError(f"unknown stage {self.name!r}; stages are {', '.join(STAGES)}")
        if not self.units:
            raise ValueError(f"stage {self.name} has no units; give at least one, e.g. 'ir'")
        for unit in self.units:
            parse_polynomial(resolve_expression(unit))  # raises for bad modules/polynomials

    def __str__(self) -> str:
        return f"{self.name}: {_compress(self.units)}"


@dataclass(frozen=True)
class NetworkSpec:
    """The units of stages A, B and C.

    Attributes:
        stages: Exactly three stages, A, B and C in order.

    """

    stages: tuple[StageSpec, ...]

    def __post_init__(self) -> None:
        names = tuple(s.name for s in self.stages)
        if names != STAGES:
            raise ValueError(
                f"a spec needs stages A, B and C in that order, got {', '.join(names) or 'none'}"
            )

    @property
    def depths(self) -> tuple[int, ...]:
        """Units per stage, e.g. (10, 20, 10) for the Very Deep PolyNet."""
        return tuple(len(s.units) for s in self.stages)

    @property
    def units(self) -> tuple[tuple[str, str], ...]:
        """Every unit as (stage name, module), bottom to top."""
        return tuple((s.name, u) for s in self.stages for u in s.units)

    def __str__(self) -> str:
        return " | ".join(str(s) for s in self.stages)

    @classmethod
    def parse(cls, text: str) -> NetworkSpec:
        """Parse the grammar in this module's docstring.

        Raises:
            ValueError: Naming the position and the problem.

        """
        return _SpecParser(text).parse()


def _compress(units: tuple[str, ...]) -> str:
    """Shortest 'item xN' form for a stage: a repeated unit or a repeated group."""
    n = len(units)
    for period in range(1, n + 1):
        if n % period == 0 and units == units[:period] * (n // period):
            group = units[:period]
            body = group[0] if period == 1 else f"({', '.join(group)})"
            return body if n == period else f"{body} x{n // period}"
    return ", ".join(units)  # pragma: no cover - period n always matches


class _SpecParser(TokenStream):
    def __init__(self, text: str) -> None:
        super().__init__(
            text,
            _TOKEN,
            "network spec",
            hint=" (example: 'A: 2-way x10 | B: (poly-3, 2-way) x10 | C: (poly-3, 2-way) x5')",
        )

    def parse(self) -> NetworkSpec:
        stages = []
        while True:
            kind, name, pos = self.take()
            if kind != "name" or name not in STAGES:
                self.fail(pos, f"expected a stage name A, B or C, found {name or 'the end'!r}")
            if self.take()[1] != ":":
                self.fail(self.tokens[self.i - 1][2], f"expected ':' after stage {name}")
            try:
                stages.append(StageSpec(name, self.seq()))
            except ValueError as err:
                if str(err).startswith("bad network spec"):
                    raise
                self.fail(pos, str(err))
            kind, value, pos = self.take()
            if kind == "end":
                break
            if value != "|":
                self.fail(pos, f"expected '|' between stages, found {value!r}")
        counts = Counter(s.name for s in stages)
        if any(n > 1 for n in counts.values()) or tuple(counts) != STAGES:
            self.fail(0, f"stages must be A, B and C once each in order, got {list(counts)}")
        return NetworkSpec(tuple(stages))

    def seq(self) -> tuple[str, ...]:
        units = list(self.item())
        while self.peek()[1] in {",", "->"}:
            self.take()
            units.extend(self.item())
        return tuple(units)

    def item(self) -> tuple[str, ...]:
        kind, value, pos = self.take()
        if value == "(":
            units = self.seq()
            if self.take()[1] != ")":
                self.fail(pos, "missing ')' for this '('")
        elif kind in {"name", "poly"}:
            try:
                parse_polynomial(resolve_expression(value))
            except ValueError as err:
                self.fail(pos, str(err))
            units = (value.lower() if kind == "name" else value,)
        else:
            self.fail(pos, f"expected a module or '(', found {value or 'the end'!r}")
        kind, value, pos = self.peek()
        if kind == "repeat":
            self.take()
            count = int(value[1:].strip())
            if count < 1:
                self.fail(pos, "a repeat count must be at least 1")
            units = units * count
        return units
