import json
import subprocess
import sys

import pytest

from polynet.cli import main


def test_info_json_matches_the_released_counts(capsys):
    assert main(["info", "polynet_very_deep", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["params"] == 95_366_600
    assert report["parts"]["stage_b"]["count"] == 20
    assert report["input_size"] == [3, 331, 331]


def test_info_table_for_a_spec(capsys):
    assert (
        main(["info", "polynet", "--spec", "A: 2-way | B: mpoly-3 | C: ir", "--input-size", "75"])
        == 0
    )
    out = capsys.readouterr().out
    assert "B: I + F + GF + HGF" in out and "input 3x75x75" in out


def test_list_filters(capsys):
    assert main(["list", "polynet_3_6_3_b_*"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("polynet_3_6_3_b_") for line in lines)


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["info", "polynet_nope"], "unknown model 'polynet_nope'"),
        (["info", "polynet", "--spec", "A: ir"], "bad network spec"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("polynet: error: ") and fragment in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="unknown model"):
        main(["--debug", "info", "polynet_nope"])


def test_console_script_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "polynet", "info", "polynet_x"], capture_output=True, text=True
    )
    assert (
        done.returncode == 2 and "unknown model" in done.stderr and "Traceback" not in done.stderr
    )


def test_the_clis_precision_and_runtime_choices_are_the_librarys():
    # Spelled out in polynet.cli so that --help does not import torch.
    from polynet.cli import PRECISION_CHOICES, RUNTIME_CHOICES
    from polynet.inference.fuse import PRECISIONS, RUNTIMES

    assert PRECISION_CHOICES == ("auto", *PRECISIONS)
    assert RUNTIME_CHOICES == RUNTIMES
