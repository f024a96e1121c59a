"""The benchmarked configurations ("candidates") and which of them a run measures.

Every candidate computes in one precision (``fp32``, ``bf16`` or ``int8``) and runs in one
runtime (eager PyTorch or ONNX Runtime). ``polynet bench --precision`` chooses the precisions;
the candidates measured are those of the chosen precisions that are on by default, or the ones
named with ``--candidates``. The like-for-like targets (:func:`targets`) pair each of our fast
paths with what a port user gets in the same precision and runtime. This module is data and
selection only: the models are built in :mod:`polynet.bench.build`, the targets evaluated in
:mod:`polynet.bench.report`.
"""

from __future__ import annotations

from dataclasses import dataclass

from polynet.devices import native_bf16, resolve_precision
from polynet.errors import UserError

PRECISIONS = ("fp32", "bf16", "int8")
"""What a candidate's convolutions compute in, in the order rows are listed."""


@dataclass(frozen=True)
class Candidate:
    """One benchmarked configuration.

    Attributes:
        name: Its row name.
        description: One line for the report.
        precision: ``"fp32"``, ``"bf16"`` or ``"int8"``; its GFLOP/s are divided by the matmul
            peak of this precision.
        modes: ``"infer"`` and/or ``"train"``.
        runtime: ``"torch"`` or ``"onnxruntime"`` (CPU only; no memory row, see the docs).
        channels_last: Feed it channels-last input (else NCHW, as the model expects).
        autocast: Run its steps under ``torch.autocast(dtype=torch.bfloat16)``.
        default: Measured without being named when its precision is chosen; the others are
            measured when named, with ``--precision all`` or (``compiled``) with ``--compile``.
        compiled: Built with ``torch.compile``; its first step, which compiles, is timed
            separately and left out of the images/s.

    """

    name: str
    description: str
    precision: str = "fp32"
    modes: tuple[str, ...] = ("infer", "train")
    runtime: str = "torch"
    channels_last: bool = True
    autocast: bool = False
    default: bool = True
    compiled: bool = False

    @property
    def base(self) -> str:
        """The candidate whose model this one runs: its fp32 namesake if autocast, else itself."""
        return self.name.removesuffix("-bf16") if self.autocast else self.name


_INFER = ("infer",)
_TRAIN = ("train",)
_ORT = dict(runtime="onnxruntime", modes=_INFER, channels_last=False)
_AUTOCAST = "under bf16 autocast (one line for a user)"

REGISTRY: dict[str, Candidate] = {
    c.name: c
    for c in (
        Candidate("polynet", "polynet_very_deep, eager, channels_last, cascaded"),
        Candidate(
            "polynet-fused",
            "polynet.inference.fuse.optimize_for_inference(polynet_very_deep)",
            modes=_INFER,
        ),
        Candidate(
            "polynet-fused-plain",
            "the same without oneDNN weight pre-packing (prepack=False)",
            modes=_INFER,
        ),
        Candidate(
            "polynet-naive",
            "polynet_very_deep with every path evaluated separately (forward_naive)",
            modes=_INFER,
        ),
        Candidate(
            "polynet-ckpt", "polynet_very_deep with set_grad_checkpointing(True)", modes=_TRAIN
        ),
        Candidate(
            "polynet-compiled",
            "polynet with every unit and Mixed part torch.compile'd (compile_units)",
            default=False,
            compiled=True,
        ),
        Candidate(
            "polynet-ort",
            "optimize_for_inference(polynet_very_deep, runtime='onnxruntime'): the folded "
            "copy exported to ONNX, run in ONNX Runtime (polynet eval/predict --runtime "
            "onnxruntime)",
            default=False,
            **_ORT,
        ),
        Candidate(
            "port", "pretrainedmodels.polynet, eager, as released (NCHW)", channels_last=False
        ),
        Candidate("port-cl", "pretrainedmodels.polynet converted to channels_last"),
        Candidate(
            "port-ort",
            "pretrainedmodels.polynet exported to ONNX as it is, run in ONNX Runtime",
            default=False,
            **_ORT,
        ),
        Candidate(
            "timm-irv2",
            "timm inception_resnet_v2 (the TF-slim Inception-ResNet-v2), as released",
            channels_last=False,
        ),
        Candidate("polynet-bf16", f"polynet {_AUTOCAST}", precision="bf16", autocast=True),
        Candidate(
            "polynet-fused-bf16",
            "optimize_for_inference(polynet_very_deep, precision='bf16'): bf16 weights",
            precision="bf16",
            modes=_INFER,
        ),
        Candidate(
            "polynet-ckpt-bf16",
            f"polynet-ckpt {_AUTOCAST}",
            precision="bf16",
            modes=_TRAIN,
            autocast=True,
            default=False,
        ),
        Candidate(
            "polynet-compiled-bf16",
            f"polynet-compiled {_AUTOCAST}",
            precision="bf16",
            autocast=True,
            default=False,
            compiled=True,
        ),
        Candidate("port-cl-bf16", f"port-cl {_AUTOCAST}", precision="bf16", autocast=True),
        Candidate(
            "polynet-int8",
            "optimize_for_inference(polynet_very_deep, precision='int8'): ONNX Runtime static "
            "int8 (QDQ), calibrated on 2 random batches",
            precision="int8",
            **_ORT,
        ),
        Candidate(
            "port-ort-int8",
            "pretrainedmodels.polynet quantized by the same code "
            "(polynet.inference.quantize.quantize_int8, same calibration batches)",
            precision="int8",
            **_ORT,
        ),
    )
}
"""Every candidate, in the order rows are listed."""


@dataclass(frozen=True)
class Target:
    """Our candidate must reach ``ratio`` times the reference's images/s in the same run.

    Attributes:
        label: What is compared, e.g. ``"inference bf16"``.
        ours: Our candidate.
        reference: The port's candidate.
        mode: ``"infer"`` or ``"train"``.
        ratio: The least images/s ratio that meets the target.
        memory: Ours must also peak at no more memory than the reference.

    """

    label: str
    ours: str
    reference: str
    mode: str
    ratio: float
    memory: bool = False


def targets(default_precision: str) -> tuple[Target, ...]:
    """The issue's like-for-like targets (issue #16, item 4).

    Args:
        default_precision: What ``polynet predict`` picks on this device (``"bf16"`` or
            ``"fp32"``): our default path is the fused model at that precision.

    """
    default = "polynet-fused-bf16" if default_precision == "bf16" else "polynet-fused"
    return (
        Target("inference fp32", "polynet-fused", "port-cl", "infer", 1.3),
        # What an fp32 user of polynet gets at best (--runtime onnxruntime) against the port.
        Target("inference fp32, polynet in ONNX Runtime", "polynet-ort", "port-cl", "infer", 1.3),
        Target("inference bf16", "polynet-fused-bf16", "port-cl-bf16", "infer", 1.3),
        Target("inference int8", "polynet-int8", "port-cl-bf16", "infer", 2.0),
        Target("training bf16", "polynet-bf16", "port-cl-bf16", "train", 1.3, memory=True),
        Target(
            "training bf16, compiled",
            "polynet-compiled-bf16",
            "port-cl-bf16",
            "train",
            1.3,
            memory=True,
        ),
        Target("ONNX Runtime fp32", "polynet-ort", "port-ort", "infer", 1.0),
        Target("ONNX Runtime int8", "polynet-int8", "port-ort-int8", "infer", 1.0),
        Target(
            f"default path ({default_precision}) vs the port exported to ONNX Runtime",
            default,
            "port-ort",
            "infer",
            1.0,
        ),
    )


LIKE_FOR_LIKE = "like-for-like"
"""``--candidates`` name of every candidate a target compares (compiled ones: ``--compile``)."""


def _like_for_like() -> tuple[str, ...]:
    named = {n for t in targets("bf16") + targets("fp32") for n in (t.ours, t.reference)}
    named.add("port")  # the "vs port" column's baseline
    return tuple(n for n in REGISTRY if n in named and not REGISTRY[n].compiled)


@dataclass(frozen=True)
class Selection:
    """What one run measures.

    Attributes:
        names: Candidate names, in :data:`REGISTRY` order.
        precisions: The precisions measured.
        why: How the precisions were chosen, for the run's first line and the report.

    """

    names: tuple[str, ...]
    precisions: tuple[str, ...]
    why: str


def _precisions(request: str, device: str) -> tuple[tuple[str, ...], str]:
    where = "GPU" if device == "cuda" else "CPU"
    if request == "auto":
        if native_bf16(device):
            return ("fp32", "bf16"), f"auto: fp32, and bf16 as this {where} computes it natively"
        return ("fp32",), f"auto: fp32 only, this {where} has no native bf16"
    if request == "all":
        if device == "cuda":
            return ("fp32", "bf16"), "all (int8 runs on the CPU only)"
        return PRECISIONS, "all"
    asked = [p.strip() for p in request.split(",") if p.strip()]
    unknown = [p for p in asked if p not in PRECISIONS]
    if unknown or not asked:
        raise UserError(
            f"unknown precision {request!r}; use --precision auto, all or a comma list of "
            f"{','.join(PRECISIONS)}"
        )
    for precision in asked:
        resolve_precision(precision, device)  # int8 off the CPU: the shared one-line error
    return tuple(p for p in PRECISIONS if p in asked), f"--precision {request}"


def select(
    candidates: tuple[str, ...] | None,
    precision: str = "auto",
    device: str = "cpu",
    compile: bool = False,
) -> Selection:
    """The candidates and precisions one run measures.

    Args:
        candidates: Names to measure (:data:`LIKE_FOR_LIKE` stands for every candidate a
            target compares); None: the default candidates of the chosen precisions
            (every candidate with ``precision="all"``, compiled ones only with ``compile``).
        precision: ``"auto"`` (fp32, plus bf16 where ``device`` computes it natively; named
            candidates are measured at their own precisions), ``"all"``, or a comma list of
            :data:`PRECISIONS`.
        device: ``"cpu"`` or ``"cuda"``.
        compile: Add the compiled candidate of each chosen fp32/bf16 precision.

    Raises:
        UserError: For unknown names or precisions, a named candidate outside the chosen
            precisions, or an ONNX Runtime candidate on CUDA.

    """
    if candidates is not None and LIKE_FOR_LIKE in candidates:
        others = [c for c in candidates if c != LIKE_FOR_LIKE]
        candidates = (*others, *(c for c in _like_for_like() if c not in others))
    if candidates is not None:
        unknown = [c for c in candidates if c not in REGISTRY]
        if unknown:
            valid = ", ".join([*REGISTRY, LIKE_FOR_LIKE])
            raise UserError(f"unknown candidates {unknown}; valid: {valid}")
    if precision == "auto" and candidates:
        named = {REGISTRY[c].precision for c in candidates}
        precisions = tuple(p for p in PRECISIONS if p in named)
        why = "auto: the precisions of the named candidates"
    else:
        precisions, why = _precisions(precision, device)
    if candidates:
        outside = [c for c in candidates if REGISTRY[c].precision not in precisions]
        if outside:
            c = REGISTRY[outside[0]]
            raise UserError(
                f"{c.name} is a {c.precision} candidate, outside --precision {precision}; "
                f"add {c.precision} to --precision or drop {c.name}"
            )
        wanted = set(candidates)
    else:
        every = precision == "all"
        wanted = {
            c.name
            for c in REGISTRY.values()
            if c.precision in precisions
            and (c.default or every)
            and not c.compiled
            and (device == "cpu" or c.runtime == "torch")
        }
    if compile:
        wanted |= {c.name for c in REGISTRY.values() if c.compiled and c.precision in precisions}
    if device != "cpu":
        on_cpu = [c for c in REGISTRY if c in wanted and REGISTRY[c].runtime != "torch"]
        if on_cpu:
            raise UserError(
                f"{on_cpu[0]} runs in ONNX Runtime on the CPU; drop it or use --device cpu"
            )
    return Selection(tuple(c for c in REGISTRY if c in wanted), precisions, why)


__all__ = [
    "LIKE_FOR_LIKE",
    "PRECISIONS",
    "REGISTRY",
    "Candidate",
    "Selection",
    "Target",
    "select",
    "targets",
]
