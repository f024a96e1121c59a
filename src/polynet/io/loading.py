"""The one way from a file to a model: :func:`load_model`.

Every workflow that reads weights (``eval``, ``predict``, ``export``, ``grow``, training's
``--init-from``, the ablation runner, ``create_model(checkpoint_path=)``) comes through here.
The file formats themselves live below this module: :mod:`polynet.io.checkpoint` (training
checkpoints) and :mod:`polynet.io.weights` (safetensors, the released port's layout). The model
is rebuilt from the configuration the file records (:class:`~polynet.model.network.PolyNetConfig`),
never guessed from its tensors.

Import order, so that nothing imports in a circle: ``checkpoint`` <- ``weights`` <- ``zoo``
<- ``loading``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polynet.io.checkpoint import CheckpointError, atomic_write
from polynet.io.weights import (
    PORT_MODEL,
    WeightsFile,
    fit_state_dict,
    preprocessing,
    read_weights,
    save_weights,
    to_port_layout,
)
from polynet.model.network import describe_classes
from polynet.model.zoo import check_model_name, create_model

__all__ = ["CheckpointError", "WeightsFile", "build_from_file", "convert", "load_model"]


def _model_args(weights: WeightsFile, name: str) -> dict[str, Any]:
    """Constructor arguments recorded by the file, for the model it names."""
    if name != weights.model_name:
        return {}
    if weights.model_config:  # the whole architecture (files written since the config)
        return dict(weights.model_config)
    return dict(weights.model_kwargs)  # overrides of the registered model (older files)


def build_from_file(
    weights: WeightsFile,
    model_name: str | None = None,
    factory: Callable[..., nn.Module] = create_model,
    **overrides: Any,
) -> tuple[nn.Module, str]:
    """Build, without loading weights, the model that a file's tensors belong to.

    Args:
        weights: A file read by :func:`~polynet.io.weights.read_weights`.
        model_name: The registered model to build. By default the one the file names, else
            ``polynet_very_deep`` (a file without metadata is the released port's). A name
            other than the one a file records is an error: the file fixes the architecture.
        factory: Builds a model from a name and keyword arguments (the ablation runner's
            factory also builds its ResNet baselines).
        **overrides: Constructor arguments on top of those the file records (e.g.
            ``num_classes`` for fine-tuning, ``drop_rate``).

    Returns:
        The model (random weights) and the name it was built under.

    Raises:
        ValueError: For an unknown name or one that contradicts the file.

    """
    if model_name is not None and weights.model_name and model_name != weights.model_name:
        raise ValueError(
            f"{weights.path} holds {weights.model_name} weights, not {model_name}; drop the "
            "model name to build the file's own architecture"
        )
    name = model_name or weights.model_name or PORT_MODEL
    if factory is create_model:
        check_model_name(name)
    return factory(name, **{**_model_args(weights, name), **overrides}), name


def load_model(
    path: str | os.PathLike,
    model_name: str | None = None,
    *,
    factory: Callable[..., nn.Module] = create_model,
    adapt: bool = True,
    map_location: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[nn.Module, WeightsFile]:
    """Rebuild the model stored in any weights file and load its tensors, in eval mode.

    Accepts polynet training checkpoints, converted ``.safetensors`` and plain state dicts in
    our layout or the released port's; none can run code when read.

    Args:
        path: The file.
        model_name: The model to build (see :func:`build_from_file`).
        factory: Model factory (see :func:`build_from_file`).
        adapt: Re-initialise a classifier of another size (with a warning) and adapt the
            first conv to other input channels, as timm does; without it any difference is an
            error.
        map_location: Device of the loaded model.
        **overrides: Constructor arguments on top of those the file records.

    Returns:
        The model in eval mode and the file (its metadata: name, config, class names,
        preprocessing and, for a checkpoint, the whole payload).

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: For an unreadable or unsafe file, or one that does not fit.
        ValueError: For a model name that contradicts the file.

    """
    weights = read_weights(path)
    model, _ = build_from_file(weights, model_name, factory, **overrides)
    model.load_state_dict(fit_state_dict(weights, model, adapt=adapt), strict=True)
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is not None and weights.class_names and len(weights.class_names) == model.num_classes:
        describe_classes(cfg, model.num_classes, weights.class_names)  # timm's label_names
    return model.to(map_location).eval(), weights


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model_name: str | None = None,
    to_port: bool = False,
) -> dict[str, Any]:
    """Convert a weights file to our ``.safetensors`` or to the released port's layout.

    The model is built on the ``meta`` device, so only the file's tensors take memory.

    Args:
        src: Any file :func:`~polynet.io.weights.read_weights` accepts (e.g.
            ``polynet-f71d82a5.pth``).
        dst: ``.safetensors`` destination; with ``to_port``, a ``torch.save`` file that the
            port's ``PolyNet.load_state_dict`` loads strictly.
        model_name: The model the weights belong to; by default the one ``src`` names, else
            ``polynet_very_deep``.
        to_port: Write the port's layout instead of ours.

    Returns:
        A summary: model name, tensor and parameter counts, destination.

    Raises:
        CheckpointError: If ``src`` is unreadable or does not fit the model exactly.
        ValueError: For a destination of the wrong kind, the source itself as destination, or
            a model the port cannot express.

    """
    dst = Path(dst)
    if not to_port and dst.suffix != ".safetensors":
        raise ValueError(
            f"destination {dst} must end in .safetensors (or ask for the port's layout with "
            "--to-port)"
        )
    if dst.exists() and Path(src).exists() and dst.resolve() == Path(src).resolve():
        raise ValueError(f"destination {dst} is the source file; choose another destination")
    weights = read_weights(src)
    with torch.device("meta"):  # the structure and shapes, without allocating 95M parameters
        model, name = build_from_file(weights, model_name)
    state = fit_state_dict(weights, model, adapt=False)
    if to_port:
        port_state = to_port_layout(state, model)
        atomic_write(dst, lambda f: torch.save(port_state, f))
    else:
        config = getattr(model, "config", None)
        save_weights(
            dst,
            state,
            name,
            model_config=config.to_dict() if config is not None else None,
            pretrained_cfg=preprocessing(model),
            class_names=weights.class_names,
        )
    num_params = sum(p.numel() for p in model.parameters())
    return dict(model_name=name, tensors=len(state), params=num_params, dst=str(dst))
