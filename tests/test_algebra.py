import random

import pytest

from polynet.model.algebra import PAPER_MODULES, named_expression, parse

# (module, expression, cascaded block evaluations, naive block evaluations)
NAMED = [
    ("ir", "I + F", 1, 1),
    ("2-way", "I + F + G", 2, 2),
    ("3-way", "I + F + G + H", 3, 3),
    ("poly-2", "I + F + F^2", 2, 3),
    ("poly-3", "I + F + F^2 + F^3", 3, 6),
    ("mpoly-2", "I + F + GF", 2, 3),
    ("mpoly-3", "I + F + GF + HGF", 3, 6),
]


@pytest.mark.parametrize("name,expression,evals,naive", NAMED)
def test_named_modules(name, expression, evals, naive):
    assert named_expression(name) == expression
    poly = parse(expression)
    assert str(poly) == expression
    assert poly.num_block_evals == evals
    assert poly.num_naive_block_evals == naive


def test_paper_modules_are_the_six_of_the_ablation():
    assert set(PAPER_MODULES) == {"2-way", "3-way", "poly-2", "poly-3", "mpoly-2", "mpoly-3"}


def test_higher_orders():
    assert named_expression("poly-4") == "I + F + F^2 + F^3 + F^4"
    assert parse(named_expression("mpoly-5")).num_block_evals == 5
    assert parse(named_expression("mpoly-5")).num_naive_block_evals == 15
    assert parse(named_expression("5-way")).num_block_evals == 5


def test_cascaded_form_is_the_same_polynomial():
    # The paper's rewriting I + F + GF = I + (I + G)F, and poly-2 = I + (I + F)F.
    assert parse("I + (I + G)F").terms == parse("I + F + GF").terms
    assert set(parse("I + (I + F)F").terms) == set(parse("I + F + F^2").terms)
    assert set(parse("I + (I + (I + H)G)F").terms) == set(parse("I + F + GF + HGF").terms)
    assert parse("I + F*F").terms == parse("I + F^2").terms


def test_plan_shares_right_factors():
    plan = parse("I + F + GF + HGF").plan()
    assert [(s.letter, s.parent, s.is_path_end) for s in plan] == [
        ("F", -1, True),
        ("G", 0, True),
        ("H", 1, True),
    ]
    # A path that only passes through a shared suffix: I + GF needs F but does not sum it.
    plan = parse("I + GF + HF").plan()
    assert [(s.letter, s.parent, s.is_path_end) for s in plan] == [
        ("F", -1, False),
        ("G", 0, True),
        ("H", 0, True),
    ]


def test_orders_count_powers_along_a_path():
    plan = parse("I + F + F^2 + F^3").plan()
    assert [s.order for s in plan] == [0, 1, 2]
    assert parse("I + FGF").paths() == ((("F", 0), ("G", 0), ("F", 1)),)
    assert parse("I + F + F^2 + GF").num_orders("F") == 2


def _random_polynomial(rng):
    words = set()
    for _ in range(rng.randint(1, 6)):
        words.add("".join(rng.choice("FGH") for _ in range(rng.randint(1, 4))))
    return sorted(words), "I + " + " + ".join(sorted(words))


@pytest.mark.parametrize("seed", range(25))
def test_random_expressions_evaluate_each_distinct_suffix_once(seed):
    rng = random.Random(seed)
    words, text = _random_polynomial(rng)
    poly = parse(text)
    suffixes = {w[len(w) - k :] for w in words for k in range(1, len(w) + 1)}
    assert poly.num_block_evals == len(suffixes)
    assert poly.num_naive_block_evals == sum(map(len, words))
    assert {"".join(t) for t in poly.terms} == set(words)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("F + GF", "missing identity"),
        ("I + f", "position 4: unknown token 'f'"),
        ("I + + F", "position 4: empty term"),
        ("I + F +", "position 7: empty term"),
        ("I + F + F", "term 'F' appears 2 times"),
        ("I + I + F", "identity 'I' appears twice"),
        ("I + (I + G F", "missing ')'"),
        ("I + F^0", "positive whole power"),
        ("I + F)", "unexpected ')'"),
        ("", "empty expression"),
        ("I", "no block term"),
    ],
)
def test_malformed_expressions_name_position_and_problem(text, fragment):
    with pytest.raises(ValueError, match="bad polynomial") as err:
        parse(text)
    assert fragment in str(err.value)


def test_unknown_module_lists_valid_forms():
    with pytest.raises(ValueError, match="valid modules: ir, k-way, poly-k, mpoly-k"):
        named_expression("poly3")
