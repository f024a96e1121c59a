"""Operator polynomials: the paper's algebra of residual units.

A PolyInception module is a polynomial in block operators (section 3.1): ``I`` is the identity,
capital letters are Inception blocks, juxtaposition is composition read right to left
(``GF x = G(F(x))``), ``F^2 = FF`` and a repeated letter means shared weights. This module turns
such an expression into an *evaluation plan* that computes every path of the polynomial while
evaluating each distinct path suffix only once:

    I + F + GF           three paths: x, F(x), G(F(x))
    = I + (I + G)F       F(x) is computed once and feeds both the F and GF paths

In application order (right to left) every path is a word, and paths sharing a right factor
share a prefix of that word. The plan is the trie of those words: each trie node is one block
evaluation, so ``num_block_evals`` is the number of distinct path suffixes. An order-k poly or
mpoly module thus costs k blocks instead of k(k+1)/2.
"""

# No ``from __future__ import annotations``: TorchScript reads PlanStep's field annotations as
# types (a PolyInception's scripted forward walks its plan), and strings would be lost on it.
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

from polynet.model._tokens import TokenStream

IDENTITY = "I"

# Terms are words over block letters in *written* order ("GF" = G after F); the identity is ().
Word = tuple[str, ...]


class PlanStep(NamedTuple):
    """One block evaluation of a compiled polynomial.

    A NamedTuple rather than a dataclass: a PolyInception keeps its plan as an attribute, and
    TorchScript takes lists of NamedTuples (not of dataclasses) as module attributes.

    Attributes:
        node: Index of this step's output; steps are topologically ordered.
        parent: Index of the step whose output feeds this block, or -1 for the module input.
        letter: The block applied.
        order: How many times this letter already occurs earlier on the path (0 for the first
            use). Blocks with per-order parameters (the released poly-3) select them by this.
        is_path_end: Whether some path of the polynomial ends here, so this output is summed.

    """

    node: int
    parent: int
    letter: str
    order: int
    is_path_end: bool


@dataclass(frozen=True)
class Polynomial:
    """A parsed operator polynomial.

    Attributes:
        text: The expression as written.
        terms: The non-identity terms in written order, each a word of block letters.

    """

    text: str
    terms: tuple[Word, ...]

    @property
    def letters(self) -> tuple[str, ...]:
        """Distinct block letters in order of first appearance in application order."""
        seen: dict[str, None] = {}
        for term in self.terms:
            for letter in reversed(term):
                seen.setdefault(letter)
        return tuple(seen)

    @property
    def order(self) -> int:
        """The longest path, in blocks: the paper's order of the module."""
        return max(len(t) for t in self.terms)

    def num_orders(self, letter: str) -> int:
        """The highest power in which ``letter`` occurs along one path."""
        return max(term.count(letter) for term in self.terms)

    def paths(self) -> tuple[tuple[tuple[str, int], ...], ...]:
        """Each term as (letter, order) pairs in application order (rightmost letter first)."""
        result = []
        for term in self.terms:
            seen: Counter[str] = Counter()
            path = []
            for letter in reversed(term):
                path.append((letter, seen[letter]))
                seen[letter] += 1
            result.append(tuple(path))
        return tuple(result)

    def plan(self) -> tuple[PlanStep, ...]:
        """Compile to the cascaded form: one step per distinct path suffix (a trie node)."""
        nodes: dict[tuple[tuple[str, int], ...], int] = {}
        steps: list[PlanStep] = []
        ends = set(self.paths())
        # Breadth-first by depth keeps parents before children and the paper's left-to-right
        # reading within a depth.
        for depth in range(1, self.order + 1):
            for path in self.paths():
                if len(path) < depth or path[:depth] in nodes:
                    continue
                prefix = path[:depth]
                parent = nodes[prefix[:-1]] if depth > 1 else -1
                letter, order = prefix[-1]
                nodes[prefix] = len(steps)
                steps.append(PlanStep(len(steps), parent, letter, order, prefix in ends))
        return tuple(steps)

    @property
    def num_block_evals(self) -> int:
        """Block evaluations of the cascaded form (distinct path suffixes)."""
        return len(self.plan())

    @property
    def num_naive_block_evals(self) -> int:
        """Block evaluations when every path is computed separately."""
        return sum(len(t) for t in self.terms)

    def __str__(self) -> str:
        return " + ".join([IDENTITY] + [format_word(t) for t in self.terms])


def format_word(word: Word) -> str:
    """Write a word of block letters with powers for repeats: ``("F", "F", "G")`` -> ``F^2G``."""
    out, i = [], 0
    while i < len(word):
        j = i
        while j < len(word) and word[j] == word[i]:
            j += 1
        out.append(word[i] if j - i == 1 else f"{word[i]}^{j - i}")
        i = j
    return "".join(out)


_TOKEN = re.compile(r"\s*(?:(?P<letter>[A-Z])|(?P<int>\d+)|(?P<op>[+^()*·]))")


class _Parser(TokenStream):
    """Recursive descent over the polynomial grammar.

    ``expr := term ('+' term)*``, ``term := factor+``, ``factor := atom ('^' INT)?``,
    ``atom := LETTER | 'I' | '(' expr ')'``. A polynomial is a Counter of words, so
    ``(I + G)F`` expands by distributing products.
    """

    def __init__(self, text: str) -> None:
        super().__init__(
            text,
            _TOKEN,
            "polynomial",
            unknown="; use capital letters for blocks, 'I' for the identity, '+', '^N', '*' "
            "and parentheses",
        )

    def parse(self) -> Counter[Word]:
        if not self.tokens:
            self.fail(0, "empty expression; write e.g. 'I + F + GF'")
        poly = self.expr()
        kind, value, pos = self.peek()
        if kind != "end":
            self.fail(pos, f"unexpected {value!r}")
        return poly

    def expr(self) -> Counter[Word]:
        total: Counter[Word] = Counter()
        while True:
            total.update(self.term())
            kind, value, _ = self.peek()
            if value != "+":
                return total
            self.take()

    def term(self) -> Counter[Word]:
        kind, value, pos = self.peek()
        if kind == "end" or value in {"+", ")"}:
            self.fail(pos, "empty term; every '+' needs a path on both sides")
        product: Counter[Word] = Counter({(): 1})
        while True:
            kind, value, pos = self.peek()
            if kind == "end" or value in {"+", ")"}:
                return product
            if value in {"*", "·"}:
                self.take()
                continue
            product = _multiply(product, self.factor())

    def factor(self) -> Counter[Word]:
        kind, value, pos = self.take()
        if kind == "letter":
            atom: Counter[Word] = Counter({() if value == IDENTITY else (value,): 1})
        elif value == "(":
            atom = self.expr()
            kind, value, close = self.take()
            if value != ")":
                self.fail(close, f"missing ')' for the '(' at position {pos}")
        else:
            self.fail(pos, f"expected a block letter or '(' but found {value or 'the end'!r}")
        if self.peek()[1] == "^":
            _, _, caret = self.take()
            kind, value, pos = self.take()
            if kind != "int" or int(value) < 1:
                self.fail(pos if kind != "end" else caret, "'^' needs a positive whole power")
            power: Counter[Word] = Counter({(): 1})
            for _ in range(int(value)):
                power = _multiply(power, atom)
            atom = power
        return atom


def _multiply(left: Counter[Word], right: Counter[Word]) -> Counter[Word]:
    out: Counter[Word] = Counter()
    for a, m in left.items():
        for b, n in right.items():
            out[a + b] += m * n
    return out


@cache
def parse(text: str) -> Polynomial:
    """Parse an operator polynomial such as ``"I + F + GF + HGF"`` or ``"I + (I + G)F"``.

    Args:
        text: Sum of products of block letters. ``I`` is the identity; ``F^2`` is ``FF``;
            parentheses expand by distribution; ``*`` between factors is optional.

    Returns:
        The expanded polynomial, identity first-class but stored implicitly.

    Raises:
        ValueError: Naming the position and the problem for an unknown token, an empty term,
            a missing identity term, a repeated term (the paper's modules have unit
            coefficients) or a polynomial with no block at all.

    """
    poly = _Parser(text).parse()
    if poly.get((), 0) != 1:
        problem = "missing identity term 'I'" if () not in poly else "identity 'I' appears twice"
        raise ValueError(
            f"bad polynomial {text!r}: {problem}; a residual unit is 'I + ...' with one identity"
        )
    repeated = [w for w, n in poly.items() if n > 1 and w]
    if repeated:
        raise ValueError(
            f"bad polynomial {text!r}: term {format_word(repeated[0])!r} appears "
            f"{poly[repeated[0]]} times; every path must be distinct"
        )
    terms = tuple(w for w in poly if w)
    if not terms:
        raise ValueError(f"bad polynomial {text!r}: no block term; write e.g. 'I + F'")
    return Polynomial(text=text, terms=terms)


_LETTERS = "FGHJKLMNOPQRSTUVWXYZABCDE"  # F first as in the paper; I is the identity


@cache
def named_expression(name: str) -> str:
    """The polynomial of a named module: ``ir``, ``k-way``, ``poly-k`` or ``mpoly-k``.

    Examples: ``2-way = I + F + G``, ``poly-3 = I + F + F^2 + F^3``,
    ``mpoly-3 = I + F + GF + HGF``; ``ir = I + F`` is the plain Inception residual unit.

    Raises:
        ValueError: For an unknown name, listing the valid forms.

    """
    key = name.strip().lower()
    if key == "ir":
        return "I + F"
    m = re.fullmatch(r"(\d+)-way|(m?poly)-(\d+)", key)
    k = int(m.group(1) or m.group(3)) if m else 0
    if not m or not 1 <= k <= len(_LETTERS):
        raise ValueError(
            f"unknown module {name!r}; valid modules: ir, k-way, poly-k, mpoly-k "
            f"(k = 1..{len(_LETTERS)}, e.g. 2-way, 3-way, poly-2, poly-3, mpoly-2, mpoly-3) "
            "or a polynomial in brackets such as [I + F + GF]"
        )
    letters = _LETTERS[:k]
    if m.group(1):
        terms = list(letters)
    elif m.group(2) == "poly":
        terms = ["F" if p == 1 else f"F^{p}" for p in range(1, k + 1)]
    else:
        terms = ["".join(reversed(letters[:p])) for p in range(1, k + 1)]
    return " + ".join([IDENTITY, *terms])


PAPER_MODULES = ("2-way", "3-way", "poly-2", "poly-3", "mpoly-2", "mpoly-3")
"""The six PolyInception modules of the paper's ablation (section 3.2)."""


def module_id(module: str) -> str:
    """A module name as it appears in identifiers: ``"mpoly-3"`` -> ``"mpoly3"``."""
    return module.replace("-", "")
