import pytest

from polynet.model.registry import MODELS, VERY_DEEP_SPEC
from polynet.model.specs import NetworkSpec


def test_very_deep_spec():
    spec = NetworkSpec.parse(VERY_DEEP_SPEC)
    assert spec.depths == (10, 20, 10)
    assert spec.stages[1].units[:4] == ("poly-3", "2-way", "poly-3", "2-way")
    assert str(spec) == VERY_DEEP_SPEC


def test_mixing_with_arrows_and_polynomials():
    spec = NetworkSpec.parse("A: ir x6 | B: (3-way -> mpoly-3 -> poly-3) x4 | C: [I + F + GF] x2")
    assert spec.depths == (6, 12, 2)
    assert spec.stages[1].units[:3] == ("3-way", "mpoly-3", "poly-3")
    assert spec.stages[2].units == ("[I + F + GF]",) * 2
    assert NetworkSpec.parse(str(spec)) == spec  # printing round-trips


def test_sequences_and_nested_groups():
    spec = NetworkSpec.parse("A: ir, 2-way x2 | B: ((ir, poly-2) x2, 3-way) x2 | C: ir")
    assert spec.stages[0].units == ("ir", "2-way", "2-way")
    assert spec.stages[1].units == ("ir", "poly-2", "ir", "poly-2", "3-way") * 2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_spec_round_trips(name):
    spec = NetworkSpec.parse(MODELS[name].spec)
    assert NetworkSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("A: ir | B: ir", "stages must be A, B and C"),
        ("A: ir | C: ir | B: ir", "stages must be A, B and C"),
        ("A: ir | B: ir | C: ir | A: ir", "stages must be A, B and C"),
        ("A: ir | B: poly3 | C: ir", "unknown module 'poly3'"),
        ("A: ir x0 | B: ir | C: ir", "at least 1"),
        ("A ir | B: ir | C: ir", "expected ':'"),
        ("D: ir | B: ir | C: ir", "expected a stage name"),
        ("A: (ir, 2-way | B: ir | C: ir", "missing ')'"),
        ("A: | B: ir | C: ir", "expected a module"),
        ("A: [I + f] | B: ir | C: ir", "unknown token 'f'"),
        ("A: ir; B: ir | C: ir", "unknown token ';'"),
    ],
)
def test_bad_specs_say_where_and_what(text, fragment):
    with pytest.raises(ValueError, match="bad network spec") as err:
        NetworkSpec.parse(text)
    assert fragment in str(err.value)
