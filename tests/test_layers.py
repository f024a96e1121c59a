"""The package's layers: no module imports from a layer above its own, and ``import polynet``
stays light.

Layers, bottom to top: the base (errors, devices, the process group), the model, data, file
formats and loading (io), inference, the workflows (training, evaluation, ablation, bench) and
the command line. A module may import from its own layer and those below.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import polynet

SRC = Path(polynet.__file__).parent
LAYERS = {
    "errors": 0,
    "devices": 0,
    "distributed": 0,
    "model": 1,
    "data": 2,
    "io": 3,
    "inference": 4,
    "training": 5,
    "evaluation": 5,
    "ablation": 5,
    "bench": 5,
    "cli": 6,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _upward_imports() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        mine = _layer(name)
        if mine is None:  # the package's front (lazy public names) and __main__
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                theirs = _layer(target) if target.startswith("polynet.") else None
                if theirs is not None and theirs > mine:
                    found.add((name, target))
    return found


def test_every_module_belongs_to_a_layer():
    for path in SRC.iterdir():
        if path.name.startswith("__") or path.name == "py.typed":
            continue
        assert path.stem in LAYERS, f"{path.name} is in no layer; add it to one"


def test_no_module_imports_from_a_layer_above_its_own():
    assert not _upward_imports(), sorted(_upward_imports())


def test_import_polynet_loads_neither_the_data_stack_nor_onnx():
    # timm itself imports PIL and torchvision's data sets; polynet adds none of its data, file
    # reading beyond safetensors, inference or workflow modules, and no ONNX.
    code = "import sys, json, polynet; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                       text=True, check=True).stdout)  # fmt: skip
    ours = {m for m in loaded if m.startswith("polynet.")}
    assert not {m for m in ours if _layer(m) not in (0, 1, 3)}, sorted(ours)
    assert not {"onnx", "onnxruntime"} & set(loaded)
