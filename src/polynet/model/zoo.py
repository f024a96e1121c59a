"""Named models, their ``pretrained_cfg`` and their registration with timm.

Each model is one row of :data:`MODELS`: a network spec plus constructor arguments. The rows
are registered as timm entry points, so after ``import polynet`` both
``polynet.create_model(name)`` and ``timm.create_model(name)`` build them, with timm's whole
model contract: ``features_only`` (every ``feature_cls``), ``pretrained=True`` with a weights
file (``pretrained_cfg_overlay=dict(file=...)``; nothing is downloaded), ``checkpoint_path=``,
``device=`` and ``dtype=``.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Mapping
from functools import cache
from typing import Any

import timm
from timm.data import ImageNetInfo
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from torch import nn

from polynet.errors import UserError
from polynet.model.network import (
    PolyNet,
    PolyNetConfig,
    describe_classes,
    feature_map_size,
    file_loading,
    take_indices,
)
from polynet.model.registry import (
    FASHION_MNIST_CLASSES,
    MODELS,
    PORT_MODEL,
    ModelDef,
    check_model_name,
    list_names,
)

STAGE_NAMES = ("stage_a", "stage_b", "stage_c")
"""The modules whose outputs are the feature maps (``feature_info``, ``out_indices``)."""
FEATURE_CLASSES = ("list", "dict", "hook", "fx", "getter")
"""timm's ``feature_cls`` names for ``features_only=True``."""


@cache
def _class_info(dataset: str) -> dict[str, Any]:
    """A data set's classes as timm's ``label_names`` (and ``label_descriptions``)."""
    if dataset == "fashion-mnist":
        return dict(label_names=tuple(FASHION_MNIST_CLASSES))
    info = ImageNetInfo(dataset)  # WordNet synsets, described by their lemmas
    return dict(
        label_names=tuple(info.label_names()),
        label_descriptions=info.label_descriptions(as_dict=True),
    )


def registered_cfg(definition: ModelDef) -> dict[str, Any]:
    """A model's whole ``pretrained_cfg``: the row's preprocessing and what follows from it.

    Adds the final feature map's size at the default input (``pool_size``, computed from the
    stem and reductions), the data set's class names (``label_names``) and ``custom_load``,
    which makes timm hand a weights file to :meth:`PolyNet.load_pretrained
    <polynet.model.network.PolyNet.load_pretrained>`.
    """
    cfg = dict(definition.cfg)
    cfg["pool_size"] = feature_map_size(
        tuple(cfg["input_size"][-2:]),
        definition.kwargs.get("stem", "imagenet"),
        definition.kwargs.get("stem_stride", 1),
    )
    cfg.update(_class_info(definition.dataset))
    if len(cfg["label_names"]) != cfg["num_classes"]:
        raise AssertionError(f"{definition.dataset} does not have {cfg['num_classes']} classes")
    cfg["custom_load"] = True
    return cfg


default_cfgs = generate_default_cfgs({name: registered_cfg(d) for name, d in MODELS.items()})


def _check_features(name: str, args: Mapping[str, Any]) -> None:
    """Raise a UserError for ``features_only`` arguments timm would fail on obscurely."""
    try:
        take_indices(args.get("out_indices", (0, 1, 2)), STAGE_NAMES)
    except UserError as err:
        raise UserError(f"{name}: out_indices={args.get('out_indices')!r}: {err}") from None
    feature_cls = args.get("feature_cls")
    if isinstance(feature_cls, str) and not (
        feature_cls.lower() in FEATURE_CLASSES or "hook" in feature_cls.lower()
    ):
        raise UserError(
            f"unknown feature_cls {feature_cls!r}; choose one of {', '.join(FEATURE_CLASSES)}"
        )


def _check_weights_given(name: str, args: Mapping[str, Any]) -> None:
    """Raise a UserError for ``pretrained=True`` without weights to load (none are downloaded)."""
    cfg = resolve_pretrained_cfg(
        name, args.get("pretrained_cfg"), args.get("pretrained_cfg_overlay")
    )
    if str(args.get("device", "")).startswith("meta"):
        raise UserError(
            f"{name}: pretrained=True cannot load weights into a model on the meta device (it "
            "holds no memory); build it on 'cpu' or a GPU"
        )
    if cfg.has_weights or cfg.state_dict is not None:
        return
    where = (
        "get the released file as docs/released-weights.md says"
        if name == PORT_MODEL
        else "it has no released weights: train it (polynet train)"
    )
    raise UserError(
        f"{name}: pretrained=True needs a weights file, and nothing is downloaded; {where}, then "
        f"pass it: timm.create_model({name!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file=PATH)) or polynet.create_model({name!r}, "
        "pretrained=True, checkpoint_path=PATH)"
    )


def _build(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    definition = MODELS[name]
    args = {"spec": definition.spec, **definition.kwargs, **kwargs}
    if args.get("features_only"):
        _check_features(name, args)
    if pretrained:
        _check_weights_given(name, args)
        # timm turns custom_load off for a file given in the overlay unless it is asked for:
        # the file must still reach PolyNet.load_pretrained, which hands it to the loading layer.
        args["pretrained_cfg_overlay"] = {
            "custom_load": True,
            **(args.get("pretrained_cfg_overlay") or {}),
        }
    model = build_model_with_cfg(
        PolyNet,
        name,
        pretrained=pretrained,
        feature_cfg=dict(flatten_sequential=False, out_indices=(0, 1, 2)),
        **args,
    )
    if not isinstance(model, PolyNet):  # a features_only wrapper: no classifier to describe
        return model
    cfg = model.pretrained_cfg
    try:  # the architecture's own stem, which the arguments may have changed
        cfg["pool_size"] = feature_map_size(
            tuple(cfg["input_size"][-2:]), model.config.stem, model.config.stem_stride
        )
    except UserError:  # an input_size (from an overlay) too small for this stem
        cfg["pool_size"] = None
    # A file's class names were taken as it loaded (PolyNet.load_pretrained).
    describe_classes(cfg, model.num_classes)
    return model


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _build(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = MODELS[name].description
    return entrypoint


for _name in MODELS:
    setattr(sys.modules[__name__], _name, register_model(_entrypoint(_name)))


def list_models(pattern: str = "*") -> list[str]:
    """Registered PolyNet model names matching a glob pattern (as ``timm.list_models``)."""
    return list_names(pattern)


# Arguments timm's factory takes besides the model's own (features_only, ...).
_FACTORY_ARGUMENTS = (
    "features_only",
    "out_indices",
    "feature_cls",
    "feature_cfg",
    "output_stride",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "cache_dir",
    "scriptable",
    "exportable",
    "no_jit",
    "device",
    "dtype",
)


def _check_arguments(kwargs: dict[str, Any]) -> None:
    """Name a misspelt constructor argument (and the closest valid one) instead of a TypeError."""
    valid = [f.name for f in dataclasses.fields(PolyNetConfig)] + list(_FACTORY_ARGUMENTS)
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(
                f"unknown model argument {key!r}; {hint}valid: "
                f"{', '.join(f.name for f in dataclasses.fields(PolyNetConfig))}"
            )


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, in timm's calling convention.

    Args:
        name: A name from :func:`list_models`; ``"polynet"`` takes any ``spec=``.
        pretrained: Load weights; they must be given by ``checkpoint_path`` since nothing is
            downloaded.
        checkpoint_path: A ``.safetensors`` file or a checkpoint written by polynet or by the
            released port (``polynet-f71d82a5.pth``).
        **kwargs: ``num_classes``, ``in_chans``, ``features_only``, any
            :class:`~polynet.model.network.PolyNet` argument.

    Raises:
        ValueError: For an unknown name (listing valid ones) or bad arguments.

    """
    check_model_name(name)
    if pretrained and checkpoint_path is None:
        raise ValueError(
            f"pretrained={pretrained} needs checkpoint_path=: weights are never downloaded; "
            "see the README for obtaining and converting the released file"
        )
    _check_arguments(kwargs)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        if isinstance(model, PolyNet):
            model.load_pretrained(checkpoint_path)  # read once, its class names taken
        else:  # a features_only wrapper: the weights only
            file_loading().load(model, checkpoint_path)
    return model
