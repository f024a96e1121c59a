"""Weights files: safe loading into any polynet model, and the released port's key layout.

File formats only: reading (:func:`read_weights`), fitting tensors to a built model
(:func:`fit_state_dict`, :func:`load_pretrained`) and writing (:func:`save_weights`); building
a model from a file is :func:`polynet.io.loading.load_model`. Three kinds of file are read, none
of which can run code:

- ``.safetensors`` written by :func:`save_weights` (``polynet convert``), whose metadata names
  the model, its constructor arguments and its evaluation preprocessing;
- a polynet training checkpoint (:mod:`polynet.io.checkpoint`);
- a plain ``torch.save`` state dict, in this package's layout or in the layout of the released
  PyTorch port of the authors' model (``pretrainedmodels``, file ``polynet-f71d82a5.pth``).
  Pickles are read with ``torch.load(weights_only=True)``, which refuses any object that is not a
  tensor or a plain container.

The port's key layout is derived from the two module structures by :func:`port_key_map`, one
rule per kind of module (stem, reduction, k-way unit, released poly-k unit), not by position.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from timm.models._manipulate import adapt_input_conv
from torch import nn

from polynet.io.checkpoint import FORMAT as CHECKPOINT_FORMAT
from polynet.io.checkpoint import CheckpointError, ModelRecord, atomic_write, read_torch_file
from polynet.io.port_layout import (
    PORT_MODEL,
    from_port_layout,
    is_port_layout,
    port_key_map,
    rename_port_keys,
    to_port_layout,
)
from polynet.model.network import FileLoading, install_file_loading

# The port's layout lives in polynet.io.port_layout; its names stay importable from here.
__all__ = [
    "PORT_MODEL",
    "WEIGHTS_FORMAT",
    "WeightsFile",
    "fit_state_dict",
    "from_port_layout",
    "load_pretrained",
    "port_key_map",
    "preprocessing",
    "read_weights",
    "save_weights",
    "to_port_layout",
]

_logger = logging.getLogger(__name__)

WEIGHTS_FORMAT = "polynet-weights"

# The evaluation preprocessing stored with converted weights (a subset of ``pretrained_cfg``).
PREPROCESSING_KEYS = (
    "input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
)
_MAX_LISTED = 3  # mismatching keys named in one error message


@dataclass
class WeightsFile:
    """The tensors of a weights file and what the file says about them.

    Attributes:
        path: Where it was read from.
        state_dict: Tensor name -> tensor, in whichever layout the file uses.
        kind: ``"safetensors"``, ``"checkpoint"`` (polynet training checkpoint) or
            ``"state_dict"`` (a plain ``torch.save`` dict, e.g. the released port's file).
        model_name: The registered model the file names, if it names one.
        model_kwargs: Constructor overrides of the registered model (files written before
            models carried their config, and non-PolyNet models).
        model_config: The whole :class:`~polynet.model.network.PolyNetConfig` the file records.
        pretrained_cfg: Preprocessing recorded in the file, if any.
        class_names: Class names recorded in the file, if any.
        payload: The whole checkpoint dict, for a polynet training checkpoint.

    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    kind: str
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict, repr=False)


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """Read a weights file of any accepted kind without executing code.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If it is truncated, corrupt, a pickle carrying code, or holds no
            state dict.

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    payload = read_torch_file(path)
    if isinstance(payload, Mapping) and payload.get("format") == CHECKPOINT_FORMAT:
        record = ModelRecord.read(payload)
        return WeightsFile(
            path,
            dict(record.state_dict),
            "checkpoint",
            record.model_name,
            record.model_kwargs,
            record.pretrained_cfg,
            record.class_names,
            record.model_config,
            payload,
        )
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]  # the common {"state_dict": ...} wrapper
    if not isinstance(payload, Mapping) or not payload:
        raise CheckpointError(f"{path} holds no state dict (found {type(payload).__name__})")
    not_tensors = [k for k, v in payload.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path} is not a state dict: {len(not_tensors)} entries are not tensors "
            f"(first: {', '.join(map(str, not_tensors[:_MAX_LISTED]))})"
        )
    return WeightsFile(path, dict(payload), "state_dict")


def _read_safetensors(path: Path) -> WeightsFile:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error type and OSError
        raise CheckpointError(
            f"cannot read safetensors file {path}: {str(err).strip()[:300]} (truncated or "
            "corrupt; convert the source again)"
        ) from err
    try:
        kwargs = json.loads(metadata.get("model_kwargs", "{}"))
        config = json.loads(metadata.get("model_config", "{}"))
        cfg = json.loads(metadata.get("pretrained_cfg", "{}"))
        names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has malformed metadata: {err}") from err
    name = metadata.get("model_name")
    return WeightsFile(path, state_dict, "safetensors", name, kwargs, cfg, names, config)


# --- fitting a state dict to a model ---------------------------------------------------------


def _fill_bn_counters(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Start BatchNorm's ``num_batches_tracked`` at zero where the file lacks it.

    Files saved before PyTorch 0.4 have no such counter; it does not affect the forward pass.
    """
    for key, value in expected.items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value, device="cpu")


def _adapt(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Fine-tuning adaptations in timm's manner: a new classifier and a different input."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    expected = model.state_dict()
    classifier = cfg.get("classifier", "last_linear")
    for suffix in ("weight", "bias"):
        key = f"{classifier}.{suffix}"
        if key not in state:
            continue
        if key not in expected:  # num_classes=0 or features_only: nothing to load into
            del state[key]
        elif state[key].shape != expected[key].shape:
            if suffix == "weight":
                (have_out, have_in), (want_out, want_in) = state[key].shape, expected[key].shape
                what = (
                    f"a {have_out}-class classifier; it is re-initialised for num_classes="
                    f"{want_out}"
                    if have_out != want_out
                    else f"a classifier of {have_in} features where the model has {want_in} (a "
                    "different width?); it is re-initialised"
                )
                warnings.warn(f"{path} has {what} and must be trained", stacklevel=4)
            state[key] = expected[key]  # keep the model's fresh initialisation
    first_conv = f"{cfg.get('first_conv', 'stem.conv1.conv')}.weight"
    if first_conv in state and first_conv in expected:
        weight, want = state[first_conv], expected[first_conv]
        if weight.ndim == 4 and weight.shape[1] != want.shape[1]:
            _logger.info(
                "adapting %s from %d to %d input channels",
                first_conv,
                weight.shape[1],
                want.shape[1],
            )
            state[first_conv] = adapt_input_conv(want.shape[1], weight, base_chans=weight.shape[1])


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture", type(model).__name__)


def _check_fit(state: Mapping[str, torch.Tensor], model: nn.Module, weights: WeightsFile) -> None:
    """Raise one CheckpointError naming the first missing, unexpected and misshapen keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    problems = [
        f"{len(found)} {what} (first: {', '.join(found[:_MAX_LISTED])})"
        for what, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes (file vs model)", shapes),
        )
        if found
    ]
    arch = _architecture(model)
    if weights.model_name and weights.model_name != arch:
        hint = f"it holds {weights.model_name} weights; build that model instead"
    else:
        hint = "it is a checkpoint of another architecture or of different model arguments"
    raise CheckpointError(f"{weights.path} does not fit {arch}: {'; '.join(problems)}; {hint}")


def fit_state_dict(
    weights: WeightsFile, model: nn.Module, adapt: bool = True
) -> dict[str, torch.Tensor]:
    """Rename, adapt and check the file's tensors for ``model``.

    Args:
        weights: A file read by :func:`read_weights`.
        model: The model to load into (a model on the ``meta`` device is fine).
        adapt: Drop a classifier of another size (with a warning) and adapt the first conv to
            ``in_chans`` as timm does; without it, any difference is an error.

    Returns:
        A state dict with exactly ``model``'s keys and shapes.

    Raises:
        CheckpointError: Listing the first missing, unexpected and misshapen keys.

    """
    state = dict(weights.state_dict)
    if is_port_layout(set(state), model):
        state = from_port_layout(state, model)
    expected = model.state_dict()
    _fill_bn_counters(state, expected)
    if adapt:
        _adapt(state, model, weights.path)
    _check_fit(state, model, weights)
    return state


def load_pretrained(model: nn.Module, checkpoint_path: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``model``.

    Accepts converted ``.safetensors``, polynet checkpoints and plain state dicts in our layout
    or the released port's. A classifier of another size is re-initialised with a warning; the
    first conv is adapted when ``in_chans`` differs.

    Args:
        model: The freshly built model.
        checkpoint_path: The weights file.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: For an unreadable or unsafe file, or one that does not fit the model.

    """
    weights = read_weights(checkpoint_path)
    model.load_state_dict(fit_state_dict(weights, model), strict=True)
    return model


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """Return the evaluation preprocessing of a model's ``pretrained_cfg``, JSON-able."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in PREPROCESSING_KEYS
    }


# --- writing ---------------------------------------------------------------------------------


def save_weights(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    model_name: str,
    model_config: Mapping[str, Any] | None = None,
    pretrained_cfg: Mapping[str, Any] | None = None,
    class_names: list[str] | None = None,
) -> None:
    """Atomically write a ``.safetensors`` file with the model name and preprocessing.

    Args:
        path: Destination, ending in ``.safetensors``.
        state_dict: The tensors (our layout).
        model_name: The registered model they belong to.
        model_config: The model's :class:`~polynet.model.network.PolyNetConfig` as a dict.
        pretrained_cfg: Evaluation preprocessing (see :func:`preprocessing`).
        class_names: Names of the classifier's outputs, for ``polynet predict``.

    """
    metadata = {
        "format": WEIGHTS_FORMAT,
        "model_name": model_name,
        "model_config": json.dumps(dict(model_config or {})),
        "pretrained_cfg": json.dumps(dict(pretrained_cfg or {})),
    }
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().cpu().contiguous()
        if tensor.data_ptr() in seen:  # a tied weight (sharing="norms"): safetensors stores copies
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    data = safetensors.torch.save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def _load_file(model: nn.Module, path: str | os.PathLike) -> list[str] | None:
    """Load a weights file into ``model`` (read once); the class names it records."""
    weights = read_weights(path)
    model.load_state_dict(fit_state_dict(weights, model), strict=True)
    return weights.class_names


# The model knows no file format: the loading layer installs how files reach it.
install_file_loading(FileLoading(load=_load_file, adapt_state_dict=rename_port_keys))
