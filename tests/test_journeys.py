"""Every command that README.md and docs/*.md show, run as a user would, at tiny sizes.

The documents are read here: each ``polynet ...`` (or ``torchrun``/``python``) line of their
``bash`` blocks must have a journey below, and each journey runs that exact command line with
only flags appended that shrink it (fewer steps, narrower networks, fewer images) and files it
names made first (a tiny ImageNet-layout folder for ``/data/imagenet``, the released port's
layout for ``polynet-f71d82a5.pth``). A documented command that stops working fails here.
Commands run in a fresh working folder, so relative paths such as ``runs/fm`` land there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import polynet
from polynet.cli import main
from polynet.data import FASHION_MNIST_CLASSES, fashion_mnist_dir
from polynet.io.checkpoint import load_checkpoint
from polynet.io.weights import to_port_layout

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

pytestmark = [
    pytest.mark.skipif(
        not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
        reason="dataset-fashion-mnist missing",
    ),
    pytest.mark.xdist_group("journeys"),  # one worker: the fixtures below are built once
]

# Shrinks a Fashion-MNIST training run; the quick-start model's shape (stride-2 stem,
# released sharing) is kept, only narrower.
SMALL_MODEL = "{width_mult: 0.03125, sharing: released, stem_stride: 2}"
TINY_TRAIN = [
    "--train-subset",
    "64",
    "--val-subset",
    "32",
    "--batch-size",
    "16",
    "--steps",
    "4",
    "--bn-recalibrate",
    "0",
    "--threads",
    "1",
    "--no-progress",
]
TINY_FOLDER_TRAIN = [
    "--train-subset",
    "8",
    "--val-subset",
    "4",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--threads",
    "1",
    "--workers",
    "0",
    "--no-progress",
    "--model-kwargs",
    "{width_mult: 0.03125}",
]
TINY_ABLATE = [
    "--steps",
    "2",
    "--batch-size",
    "8",
    "--train-subset",
    "16",
    "--eval-limit",
    "16",
    "--width-mult",
    "0.03125",
    "--timing-rounds",
    "1",
    "--timing-iters",
    "1",
    "--threads",
    "1",
]
TINY_EVAL = ["--limit", "8", "--no-progress", "--workers", "0"]


# ---------------------------------------------------------------------------------------------
# The documents' commands


def documented_commands() -> dict[str, str]:
    """Every command line of the documents' bash blocks -> where it stands (file:line)."""
    found = {}
    for doc in DOCUMENTS:
        lines = doc.read_text().splitlines()
        in_bash, pending, start = False, "", 0
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                in_bash = line.strip() == "```bash"
                continue
            if not in_bash:
                continue
            text = line.split("  #", 1)[0].split(" # ", 1)[0].rstrip()
            if not pending:
                start = number
            if text.endswith("\\"):
                pending += text[:-1].strip() + " "
                continue
            command = " ".join((pending + text.strip()).split())
            pending = ""
            if re.match(r"^(polynet|torchrun|python|\.venv/bin/python|bash) ", command):
                found.setdefault(command, f"{doc.name}:{start}")
    return found


# ---------------------------------------------------------------------------------------------
# Fixtures: a working folder with what the commands name


def _image(path: Path, size=(40, 48), seed=0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out like the repository: configs/, a tiny ImageNet, images, weights."""
    root = tmp_path_factory.mktemp("journeys")
    shutil.copytree(REPO / "configs", root / "configs")
    # An ImageNet-layout folder with ImageNet's 1000 classes (one small image per class and
    # split), so a 1000-class model reads it as it would read ImageNet.
    from timm.data import ImageNetInfo

    imagenet = root / "imagenet"
    for c, name in enumerate(ImageNetInfo().label_names()):
        for split in ("train", "val"):
            _image(imagenet / split / name / "0.jpg", (24, 28), seed=c)
    for name in ("cat.jpg", "dog.png"):
        _image(root / name, (64, 80), seed=len(name))
    # The released port's file layout (random weights: the tests check the journey, not
    # ImageNet accuracy).
    with torch.device("meta"):
        meta = polynet.create_model("polynet_very_deep")
    model = polynet.create_model("polynet_very_deep").eval()
    torch.save(to_port_layout(model.state_dict(), meta), root / "polynet-f71d82a5.pth")
    del model
    return root


@pytest.fixture()
def here(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    return workspace


def run(command: str, *extra: str, substitute: dict[str, str] | None = None) -> int:
    """Run one documented ``polynet`` command line in this process, with ``extra`` flags."""
    for old, new in (substitute or {}).items():
        command = command.replace(old, new)
    argv = shlex.split(command)
    assert argv[0] == "polynet", command
    return main([*argv[1:], *extra])


# ---------------------------------------------------------------------------------------------
# The quick start's model, trained, then every workflow on it


@pytest.fixture(scope="module")
def fm_run(workspace):
    """README: ``polynet train --preset fashion-mnist --out runs/fm`` (tiny), run once."""
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        argv = "train --preset fashion-mnist --out runs/fm".split()
        assert main([*argv, *TINY_TRAIN, "--model-kwargs", SMALL_MODEL, "--steps", "8"]) == 0
    finally:
        os.chdir(cwd)
    return workspace / "runs" / "fm"


def test_every_documented_command_has_a_journey():
    documented = documented_commands()
    missing = {c: w for c, w in documented.items() if c not in JOURNEYS and c not in NOT_RUN}
    assert not missing, f"documented commands without a journey in this module: {missing}"
    stale = [c for c in [*JOURNEYS, *NOT_RUN] if c not in documented]
    assert not stale, f"journeys of commands no document shows any more: {stale}"


def test_readme_resume_continues_the_run_as_saved(here, fm_run, capsys):
    # The README's own bare resume, after the run finished: nothing is refused and the
    # run is not changed; another --threads is a setting of how, not of what.
    before = load_checkpoint(fm_run / "last.pt")
    assert run("polynet train --out runs/fm --resume", "--threads", "2") == 0
    after = load_checkpoint(fm_run / "last.pt")
    assert after["train_state"]["global_step"] == before["train_state"]["global_step"] == 8
    # An explicit setting that would change the run is refused, naming it and a fix that
    # keeps the run (never --overwrite).
    assert run("polynet train --out runs/fm --resume", "--lr", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lr" in err and "drop --lr" in err and "--overwrite" not in err


def test_eval_single_and_multi_crop(here, fm_run, capsys):
    for command in JOURNEY_GROUPS["eval"]:
        assert run(command, *TINY_EVAL, "--overwrite") == 0, command
    assert (here / "reports" / "single" / "report.json").is_file()
    assert (here / "reports" / "multi" / "report.md").is_file()
    # The same command again without --overwrite: refused before any work, reports kept.
    before = (here / "reports" / "single" / "report.json").read_bytes()
    assert run(JOURNEY_GROUPS["eval"][0], *TINY_EVAL) == 2
    assert "already exists" in capsys.readouterr().err
    assert (here / "reports" / "single" / "report.json").read_bytes() == before


def test_eval_docs_commands(here, fm_run, capsys):
    ckpt = {"CKPT": "runs/fm/best.pt", "runs/fashion-mnist/best.pt": "runs/fm/best.pt"}
    for command in JOURNEY_GROUPS["eval-docs"]:
        assert run(command, *TINY_EVAL, "--overwrite", substitute=ckpt) == 0, command


def test_grow_the_quick_start_model_keeps_its_function(here, fm_run, capsys):
    # The reported defect: the quick-start model's stride-2 stem was rebuilt at stride 1.
    source, _ = polynet.load_model(fm_run / "best.pt")
    spec = "A: 2-way x2 | B: mpoly-2 x2, poly-2 x2 | C: 2-way x2"
    assert (
        main(
            [
                "grow",
                "--from",
                "runs/fm/best.pt",
                "--to",
                spec,
                "--zero-init",
                "--out",
                "grown-qs.pt",
            ]
        )
        == 0
    )
    assert "function: preserved" in capsys.readouterr().out
    grown, _ = polynet.load_model(here / "grown-qs.pt")
    assert grown.config.stem_stride == source.config.stem_stride == 2
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), source(x), atol=1e-5, rtol=0)
    # Growing onto its own source is refused, and so is replacing an output silently.
    assert main(["grow", "--from", "grown-qs.pt", "--to", spec, "--out", "grown-qs.pt"]) == 2
    assert "is an input" in capsys.readouterr().err


def test_predict_prints_the_class_names_training_saved(here, fm_run, capsys):
    shirt = here / "shirt.png"
    _image(shirt, (28, 28))
    assert main(["predict", str(shirt), "--checkpoint", "runs/fm/best.pt", "--top-k", "10"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in FASHION_MNIST_CLASSES), printed
    # A 1x1 image is refused in one line rather than classified.
    dot = here / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    assert main(["predict", str(dot), "--checkpoint", "runs/fm/best.pt"]) == 2
    assert "too small" in capsys.readouterr().err


def test_growing_journey_of_docs_growing(here, capsys):
    # docs/growing.md, "try it": train an IR net, grow it, train the grown one.
    first, second, third = JOURNEY_GROUPS["growing"]
    assert run(first, *TINY_TRAIN, "--model-kwargs", "{width_mult: 0.03125}") == 0
    assert run(second) == 0
    assert "function: preserved" in capsys.readouterr().out
    assert run(third, *TINY_TRAIN) == 0
    grown = load_checkpoint(here / "runs" / "grown" / "last.pt")
    assert grown["model_config"]["spec"].startswith("A: 2-way x2")


def test_growing_docs_commands_from_an_ir_checkpoint(here, capsys):
    ir = here / "runs" / "ir"
    if not (ir / "last.pt").is_file():
        assert (
            main(
                [
                    "train",
                    "--model",
                    "polynet_small_ir",
                    "--out",
                    "runs/ir",
                    *TINY_TRAIN,
                    "--model-kwargs",
                    "{width_mult: 0.03125}",
                ]
            )
            == 0
        )
    shutil.copy(ir / "last.pt", ir / "best.pt")
    for command in JOURNEY_GROUPS["grow"]:
        assert run(command, "--overwrite") == 0, command
    assert run(JOURNEY_GROUPS["init-from"][0], *TINY_TRAIN, "--overwrite") == 0
    assert (
        run(
            JOURNEY_GROUPS["init-from"][1],
            *TINY_TRAIN,
            "--overwrite",
            substitute={"--out runs/g": "--out runs/g2"},
        )
        == 0
    )


def test_released_weights_journey(here, capsys):
    for command in JOURNEY_GROUPS["released"]:
        extra = ("--overwrite",) if " --out " in command or "convert" in command else ()
        assert run(command, *extra) == 0, command
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch" in printed and "1." in printed
    assert (here / "pn.onnx").is_file() and (here / "polynet.pt").is_file()


def test_evaluating_the_released_file_on_an_imagenet_folder(here, capsys):
    command = JOURNEY_GROUPS["released-eval"][0]
    substitute = {"/data/imagenet": "imagenet"}
    assert (
        run(command, "--limit", "2", "--no-progress", "--workers", "0", substitute=substitute) == 0
    )
    assert "top-1" in capsys.readouterr().out


def test_paper_imagenet_config_on_a_folder(here):
    for command in JOURNEY_GROUPS["imagenet-train"]:
        out = here / "runs" / "ir363"
        shutil.rmtree(out, ignore_errors=True)
        assert run(command, *TINY_FOLDER_TRAIN, substitute={"/data/imagenet": "imagenet"}) == 0


def test_train_with_a_config_file_and_flags(here):
    (here / "my.yaml").write_text("preset: fashion-mnist\nout: runs/my\n")
    command = JOURNEY_GROUPS["my-yaml"][0]
    assert run(command, *TINY_TRAIN, "--model-kwargs", SMALL_MODEL) == 0
    saved = load_checkpoint(here / "runs" / "my" / "last.pt")["config"]
    assert saved["lr"] == 0.1 and saved["epochs"] == 8  # the flags won over the file


def test_torchrun_commands(here):
    # In order: the README's ImageNet run (its checkpoint is then the CKPT of the
    # evaluation), the evaluation on the same folder, and the Fashion-MNIST run of docs/training.
    shutil.rmtree(here / "runs" / "ddp", ignore_errors=True)
    substitute = {"/data/imagenet": "imagenet", "CKPT": "runs/ddp/last.pt", "DIR": "imagenet"}
    for command in JOURNEY_GROUPS["torchrun"]:
        for old, new in substitute.items():
            command = command.replace(old, new)
        argv = shlex.split(command)
        if argv[0] == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        elif argv[0] == ".venv/bin/python":
            argv[0] = sys.executable
        if "--standalone" not in argv:
            argv.insert(3, "--standalone")
        argv[argv.index("--nproc_per_node") + 1] = "2"  # 2 processes here
        if " eval " in command:
            extra = [*TINY_EVAL, "--overwrite", "--scales", "342", "--batch-size", "8"]
        elif "imagenet" in command:
            extra = [*TINY_FOLDER_TRAIN, "--out", "runs/ddp"]
        else:
            extra = [*TINY_TRAIN, "--model-kwargs", SMALL_MODEL, "--out", "runs/ddp-fm"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(
            [*argv, *extra], capture_output=True, text=True, env=env, timeout=300, cwd=here
        )
        assert done.returncode == 0, (command, done.stderr[-2000:])


def test_ablation_commands(here):
    configs = dict(
        stages=["ir_3_6_3", "a_2way"],
        mixing=["ir_6_12_6", "3way"],
        depth=["resnet_50", "resnet_101"],
        scaling=["ir_3_6_3", "resnet_152"],
    )
    for command in JOURNEY_GROUPS["ablate"]:
        study = shlex.split(command)[2]
        extra = [*TINY_ABLATE, "--configs", *configs[study]]
        if "/data/imagenet" in command:
            continue  # full-width ImageNet studies: test_ablation_on_a_folder
        assert run(command, *extra) == 0, command


def test_ablation_on_a_folder(here):
    for command in JOURNEY_GROUPS["ablate-folder"]:
        argv = shlex.split(command.replace("/data/imagenet", "imagenet"))
        tiny = [
            *TINY_ABLATE,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--train-subset",
            "8",
            "--eval-limit",
            "4",
            "--amp",
            "none",
            "--workers",
            "0",
            "--configs",
            "ir_3_6_3",
        ]
        tiny.remove("--steps")
        tiny.remove("2")
        if argv[0] == "torchrun":
            argv = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                *argv[3:],
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            done = subprocess.run(
                [*argv, *tiny, "--rerun"],
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
                cwd=here,
            )
            assert done.returncode == 0, (command, done.stderr[-2000:])
        else:
            assert main([*argv[1:], *tiny]) == 0, command


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def test_ablation_commits_each_result_and_resumes_from_the_commits(tmp_path, monkeypatch, capsys):
    # docs/ablation.md: a study whose --on-result commits each result as it lands; a fresh
    # clone (another machine) running the same command trains nothing.
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "journey")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "journey@example.invalid")
    (command,) = JOURNEY_GROUPS["ablate-commit"]
    extra = [*TINY_ABLATE, "--seeds", "2", "--configs", "ir_3_6_3", "a_2way"]
    first, clone = tmp_path / "first", tmp_path / "clone"
    first.mkdir()
    _git("init", "-q", cwd=first)
    monkeypatch.chdir(first)
    assert run(command, *extra) == 0
    subjects = _git("log", "--format=%s", cwd=first).split("\n")
    pairs = [f"{c}_s{s}" for s in (0, 1) for c in ("ir_3_6_3", "a_2way")]
    assert subjects[:5] == [f"ablation stages: {k}" for k in ["report", *reversed(pairs)]]
    tracked = _git("ls-files", cwd=first).split()
    assert {f"docs/ablation/stages/results/{k}.json" for k in pairs} <= set(tracked)
    assert "docs/ablation/stages/report.md" in tracked
    assert not any(t.startswith("runs/") for t in tracked)  # checkpoints stay out
    _git("clone", "-q", str(first), str(clone), cwd=tmp_path)
    monkeypatch.chdir(clone)
    capsys.readouterr()
    assert run(command, *extra) == 0
    assert "stages: 0 trained, 4 cached" in capsys.readouterr().out


def test_ablation_as_two_local_jobs_committing_then_retimed(tmp_path, monkeypatch, capsys):
    # docs/ablation.md: the shell loop of two one-thread jobs, each committing its results
    # into one checkout as they land (their commits must not collide), then a quiet retime.
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "journey")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "journey@example.invalid")
    job, retime = JOURNEY_GROUPS["ablate-two-jobs"]
    _git("init", "-q", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    extra = [*TINY_ABLATE, "--seeds", "2", "--configs", "ir_3_6_3", "a_2way"]
    argv = shlex.split(job.removesuffix(" &"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", *[a.replace("$k", str(k)) for a in argv], *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in (1, 2)
    ]
    for process in jobs:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
        assert "--on-result exited" not in stderr, stderr[-2000:]  # no commit collided
    pairs = {f"{c}_s{s}" for s in (0, 1) for c in ("ir_3_6_3", "a_2way")}
    subjects = set(_git("log", "--format=%s", cwd=tmp_path).split("\n")) - {""}
    assert {f"ablation stages: {k}" for k in pairs} <= subjects
    tracked = set(_git("ls-files", cwd=tmp_path).split())
    assert {f"docs/ablation/stages/results/{k}.json" for k in pairs} <= tracked
    before = json.loads((tmp_path / "docs/ablation/stages/timing.json").read_text())
    capsys.readouterr()
    assert run(retime, "--timing-rounds", "1", "--timing-iters", "1") == 0
    assert "timing 2 configs" in capsys.readouterr().err
    after = json.loads((tmp_path / "docs/ablation/stages/timing.json").read_text())
    assert after["setup"]["threads"] == 1 and after["configs"] != before["configs"]


def test_ablation_split_over_jobs_then_report(here, capsys):
    shard_1, shard_2, report = JOURNEY_GROUPS["ablate-shards"]
    extra = [*TINY_ABLATE, "--seeds", "2", "--configs", "ir_3_6_3", "a_2way"]
    assert run(shard_1, *extra) == 0
    assert "when every job is done" in capsys.readouterr().out  # pairs of job 2 missing
    assert run(shard_2, *extra) == 0
    assert "2 trained, 0 cached; report" in capsys.readouterr().out  # the last pair landed
    assert run(report) == 0
    assert "0 trained, 4 cached; report" in capsys.readouterr().out
    text = (here / "runs" / "ablation" / "stages-shared" / "report.md").read_text()
    assert "4 config/seed runs; none missing" in text


def test_scripts(here, tmp_path):
    python = [sys.executable]
    commands = JOURNEY_GROUPS["scripts"]
    # The quick start: the repository's own script with a tiny run into a scratch folder.
    done = subprocess.run(
        ["bash", str(REPO / "quickstart.sh"), *TINY_TRAIN, "--out", str(tmp_path / "qs")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top-1" in done.stdout and "quickstart: finished" in done.stdout
    memory = shlex.split(commands[1])[1:]
    done = subprocess.run(
        [
            *python,
            str(REPO / memory[0]),
            *memory[1:],
            "--image-size",
            "75",
            "--batch-size",
            "2",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=here,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bench = shlex.split(commands[2])[1:]
    # The bench itself runs end to end in test_bench_commands; here the script's own path.
    quick = ["--quick", "--no-memory", "--no-train", "--candidates", "polynet"]
    done = subprocess.run(
        [*python, str(REPO / bench[0]), *bench[1:], *quick],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=here,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (here / "benchmarks" / "results" / "cpu-331-b4.json").is_file()
    for command in commands[3:]:
        argv = shlex.split(command)[1:]
        tiny = [
            "--source-steps",
            "2",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--test-subset",
            "16",
            "--train-subset",
            "64",
            "--width-mult",
            "0.03125",
            "--threads",
            "1",
        ]
        done = subprocess.run(
            [*python, str(REPO / argv[0]), *argv[1:], *tiny],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=here,
        )
        assert done.returncode == 0, (command, done.stderr[-2000:])


def test_bench_commands(here, capsys):
    # A benchmark takes minutes even at --quick sizes, so each documented command is parsed
    # and its configuration checked, and the README's runs end to end at quick sizes.
    from polynet.cli import build_parser
    from polynet.cli.bench import config_from_args

    for command in JOURNEY_GROUPS["bench"]:
        if "--device cuda" in command and not torch.cuda.is_available():
            assert run(command) == 2, command  # one line that says CUDA is missing
            assert "CUDA" in capsys.readouterr().err
            continue
        argv = shlex.split(command)[1:]
        config_from_args(build_parser(argv).parse_args(argv)).check()
    quick = ["--quick", "--no-memory", "--candidates", "polynet,polynet-fused", "--overwrite"]
    assert run(JOURNEY_GROUPS["bench"][0], *quick) == 0
    assert (here / "bench.json").is_file() and (here / "bench.md").is_file()
    # A result file is not replaced without --overwrite, and that is known before the run.
    assert run(JOURNEY_GROUPS["bench"][0], *quick[:-1]) == 2
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Crash, move, resume with the README's bare command and other threads


KILLER = """
import os, signal, sys
from polynet.training import loop

real_step = loop.Trainer.train_step


def dying_step(self, images, labels):
    if self.state.global_step + 1 == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, images, labels)


loop.Trainer.train_step = dying_step
from polynet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_moved_and_resumed_run_equals_the_uninterrupted_one(here, tmp_path):
    flags = [
        *TINY_TRAIN,
        "--model-kwargs",
        SMALL_MODEL,
        "--steps",
        "8",
        "--checkpoint-every",
        "2",
        "--deterministic",
    ]
    start = ["train", "--preset", "fashion-mnist"]
    assert main([*start, "--out", str(tmp_path / "whole"), *flags]) == 0
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = dict(os.environ, KILL_AT="6", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(killer), *start, "--out", str(tmp_path / "run"), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    moved = tmp_path / "moved" / "fm"
    moved.parent.mkdir()
    shutil.move(tmp_path / "run", moved)
    other = tmp_path / "copied"
    shutil.copytree(moved, other)
    # The README's command, the folder spelled with a trailing slash: bitwise equal.
    assert main(["train", "--out", f"{moved}/", "--resume"]) == 0
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    resumed = load_checkpoint(moved / "last.pt")
    assert resumed["train_state"]["global_step"] == 8
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert "resumed" in (moved / "train.log").read_text()
    # With other threads the run continues too; oneDNN's parallel reductions (convolution
    # weight gradients, channels-last BatchNorm) round differently with another thread count,
    # so it is equal to rounding, not bitwise.
    assert main(["train", "--out", str(other), "--resume", "--threads", "2"]) == 0
    again = load_checkpoint(other / "last.pt")
    assert again["train_state"]["global_step"] == 8
    for key, value in whole["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(again["model"][key], value, atol=1e-3, rtol=1e-3)


def test_steps_run_decays_at_the_papers_fractions(here):
    # docs/growing.md's `--steps 200` run: with the default step schedule the learning rate
    # falls x0.1 at 2/7, 4/7 and 6/7 of the run, not every 3 steps.
    from polynet.training import build_config, build_optimizer, build_scheduler

    cfg = build_config(model="polynet_small_ir", steps=200, lr=1.0)
    _, total = build_scheduler(build_optimizer(torch.nn.Linear(1, 1), cfg), cfg, 468)
    factor = build_scheduler(build_optimizer(torch.nn.Linear(1, 1), cfg), cfg, 468)[0].lr_lambdas[0]
    assert total == 200
    # 2/7, 4/7 and 6/7 of 200 steps: 57.1, 114.3 and 171.4.
    steps = (0, 57, 58, 114, 115, 171, 172, 199)
    assert [factor(s) for s in steps] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


# ---------------------------------------------------------------------------------------------
# The table: every documented command, grouped by the journey that runs it

JOURNEY_GROUPS: dict[str, list[str]] = {
    "readme-train": [
        "polynet train --preset fashion-mnist --out runs/fm",
        "polynet train --out runs/fm --resume",
    ],
    "eval": [
        "polynet eval --checkpoint runs/fm/best.pt --data fashion-mnist --out reports/single",
        "polynet eval --checkpoint runs/fm/best.pt --data fashion-mnist --multi-crop --out "
        "reports/multi",
    ],
    "eval-docs": [
        "polynet eval --checkpoint runs/fashion-mnist/best.pt --data fashion-mnist --out "
        "reports/single",
        "polynet eval --checkpoint runs/fashion-mnist/best.pt --data fashion-mnist --multi-crop "
        "--out reports/multi",
        "polynet eval --checkpoint CKPT --data fashion-mnist --multi-crop --scales 32 36 40 44 "
        "--top-fraction 0.5 --score logits --json multi.json",
    ],
    "released": [
        "polynet convert polynet-f71d82a5.pth polynet_very_deep.safetensors",
        "polynet predict cat.jpg --checkpoint polynet_very_deep.safetensors",
        "polynet predict cat.jpg dog.png --checkpoint polynet_very_deep.safetensors",
        "polynet convert --to-port polynet_very_deep.safetensors polynet-port.pth",
        "polynet export polynet_very_deep --checkpoint polynet_very_deep.safetensors --format "
        "onnx --out pn.onnx",
        "polynet export polynet_very_deep --checkpoint polynet_very_deep.safetensors --format "
        "onnx --out polynet.onnx",
        "polynet export polynet_very_deep --checkpoint polynet_very_deep.safetensors --format "
        "torchscript --out polynet.pt",
    ],
    "released-eval": [
        "polynet eval --checkpoint polynet-f71d82a5.pth --model polynet_very_deep --data "
        "/data/imagenet",
    ],
    "growing": [
        "polynet train --model polynet_small_ir --steps 200 --out runs/ir",
        'polynet grow --from runs/ir/last.pt --to "A: 2-way x2 | B: (mpoly-2, 2-way) x2 | C: '
        '2-way x2" --out runs/grown.pt --zero-init',
        "polynet train --init-from runs/grown.pt --steps 200 --out runs/grown",
    ],
    "grow": [
        "polynet grow --from runs/ir/best.pt --to polynet_6_12_6_mixed --sharing released "
        "--zero-init --out grown.pt",
        "polynet grow --from runs/ir/last.pt --to polynet_6_12_6_mixed --out grown.pt --zero-init",
        'polynet grow --from runs/ir/last.pt --to "A: mpoly-2 x2 | B: (2-way, ir) x2 | C: 2-way '
        'x2" --out grown.pt --zero-init',
    ],
    "init-from": [
        "polynet train --init-from grown.pt --data fashion-mnist --out runs/grown",
        "polynet train --init-from grown.pt --data fashion-mnist --out runs/g",
    ],
    "imagenet-train": [
        "polynet train --config configs/paper-imagenet.yaml --data /data/imagenet --out runs/ir363",
    ],
    "my-yaml": ["polynet train --config my.yaml --lr 0.1 --epochs 8"],
    "torchrun": [
        "torchrun --nproc_per_node 8 -m polynet train --config configs/paper-imagenet.yaml "
        "--data /data/imagenet",
        "torchrun --standalone --nproc_per_node 4 -m polynet eval --checkpoint CKPT --data DIR "
        "--multi-crop",
        ".venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 -m polynet "
        "train --preset fashion-mnist --out runs/ddp",
    ],
    "ablate-folder": [
        "polynet ablate stages --data /data/imagenet --out runs/ablation/stages-in1k --epochs 10 "
        "--batch-size 256 --amp bf16 --workers 8",
        "torchrun --nproc-per-node 8 -m polynet ablate stages --data /data/imagenet --out "
        "runs/ablation/stages-in1k --epochs 10 --batch-size 512 --amp bf16",
    ],
    "scripts": [
        "bash quickstart.sh",
        "python benchmarks/memory.py --mode train polynet polynet-ckpt port",
        "python benchmarks/run_bench.py --json benchmarks/results/cpu-331-b4.json --markdown "
        "benchmarks/results/cpu-331-b4.md --overwrite",
        "python benchmarks/grow_fashion_mnist.py --source-steps 200 --steps 200 --eval-every 20 "
        "--test-subset 1000 --out-png docs/growing-curves.png --out-json "
        "benchmarks/results/grow_fashion_mnist.json",
        "python benchmarks/grow_fashion_mnist.py --source-steps 200 --steps 200 --eval-every 20 "
        "--test-subset 1000 --lr-decay cosine --seed 1 --out-json "
        "benchmarks/results/grow_fashion_mnist_cosine_seed1.json",
    ],
    "ablate": [
        "polynet ablate stages --out runs/ablation/stages",
        "polynet ablate mixing --out runs/ablation/mixing",
        "polynet ablate depth --out runs/ablation/depth",
        "polynet ablate scaling --out runs/ablation/scaling",
        "polynet ablate stages --out runs/ablation/stages --publish docs/ablation/stages",
        "polynet ablate mixing --out runs/ablation/mixing --publish docs/ablation/mixing",
        "polynet ablate stages --out runs/ablation/stages-3seeds --seeds 3",
    ],
    "ablate-commit": [
        "polynet ablate stages --out docs/ablation/stages --runs runs/ablation/stages --seeds 3 "
        "--on-result 'git add docs/ablation/stages && git commit -q -m \"ablation stages: "
        "$POLYNET_PAIR\" -- docs/ablation/stages'",
    ],
    "ablate-two-jobs": [
        "polynet ablate stages --out docs/ablation/stages --runs runs/ablation/stages --seeds 3 "
        "--shard $k/2 --on-result 'git add docs/ablation/stages && git commit -q -m \"ablation "
        "stages: $POLYNET_PAIR\" -- docs/ablation/stages' &",
        "polynet ablate stages --out docs/ablation/stages --report --retime",
    ],
    "ablate-shards": [
        "polynet ablate stages --out runs/ablation/stages-shared --seeds 3 --shard 1/2",
        "polynet ablate stages --out runs/ablation/stages-shared --seeds 3 --shard 2/2",
        "polynet ablate stages --out runs/ablation/stages-shared --report",
    ],
    "bench": [
        "polynet bench --json bench.json --markdown bench.md",
        "polynet bench",
        "polynet bench --json out.json --markdown out.md",
        "polynet bench --quick",
        "polynet bench --device cuda --compile --batch-size 32",
        "polynet bench --device cuda --compile --no-infer --candidates polynet-bf16,port",
        "polynet bench --candidates polynet,polynet-fused,port --no-train --reps 5",
        "polynet bench --precision fp32 --no-memory",
        "polynet bench --precision int8 --no-train",
        "polynet bench --candidates like-for-like --json "
        "benchmarks/results/cpu-331-b4-like-for-like.json --markdown "
        "benchmarks/results/cpu-331-b4-like-for-like.md",
        "polynet bench --device cuda --batch-size 32 --candidates "
        "polynet-bf16,polynet-ckpt-bf16,port --no-memory --reps 3 --warmup 1",
        "polynet bench --device cuda --batch-size 16 --candidates "
        "polynet-bf16,polynet-ckpt-bf16,port --reps 1 --warmup 1",
    ],
}
# Documented commands this module does not run, and why (each is run in another way).
NOT_RUN = {
    "bash test.sh": "it is this test suite (CI runs it)",
    ".venv/bin/python -m pytest tests/test_reliability_crash.py tests/test_reliability_inputs.py "
    "-q": "those test modules are part of this suite",
}
JOURNEYS = {command for commands in JOURNEY_GROUPS.values() for command in commands}
