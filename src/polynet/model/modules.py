"""The PolyInception module: an operator polynomial of blocks, evaluated in cascaded form.

``PolyInception("I + F + GF", block=factory)`` computes ``act(x + s * (F(x) + G(F(x))))`` with
``F(x)`` evaluated once (the cascaded ``I + (I + G)F``); ``forward_naive`` evaluates every path
separately and is the reference the cascaded form must equal.
"""

# No ``from __future__ import annotations``: TorchScript reads the class annotation of ``plan``
# below as a type, and a postponed (string) annotation would be lost on it.
from collections.abc import Callable, Mapping
from typing import Literal, get_args

import torch
from torch import nn

from polynet.model.algebra import PlanStep, Polynomial, named_expression, parse

Sharing = Literal["full", "released", "norms"]
SHARINGS: tuple[str, ...] = get_args(Sharing)
# Sharing modes in which a repeated letter keeps per-power BatchNorms (its forward takes order).
PER_ORDER_SHARINGS = ("released", "norms")
BlockFactory = Callable[..., nn.Module]


def resolve_expression(module: str) -> str:
    """A module name (``2-way``, ``poly-3``, ...) or a polynomial, as a polynomial string."""
    text = module.strip()
    if text.startswith("[") and text.endswith("]"):
        return text[1:-1]
    return text if "+" in text else named_expression(text)


class PolyInception(nn.Module):
    """A residual unit whose residual part is a polynomial of blocks (paper, section 3.1).

    Args:
        expression: A polynomial such as ``"I + F + GF + HGF"`` or a module name (``"ir"``,
            ``"2-way"``, ``"poly-3"``, ``"mpoly-2"``, ...).
        block: Either a factory called once per distinct letter, or a mapping from letter to a
            module or factory. With ``sharing="released"`` or ``"norms"`` a factory is called
            with ``num_orders=`` (the letter's highest power; ``"norms"`` adds
            ``share_projection=True``) and its module's forward takes ``(x, order)``.
        scale: Residual scale applied to every non-identity path (the paper's beta).
        sharing: ``"full"``: a repeated letter is one block, as in the paper (``F^2 = F(F(x))``).
            ``"released"``: a repeated letter shares its convolutions but each power has its own
            norms and up-projection, and the activation is applied between successive blocks
            (the released Very Deep PolyNet's poly-3).
            ``"norms"``: every weight of a repeated letter is shared, as in the paper, but each
            power has its own BatchNorms. One shared BatchNorm would average the statistics of
            ``x`` and ``F(x)`` in its running estimates, and evaluation suffers (docs/training.md).
        act_layer: Activation after the residual sum (the unit's output nonlinearity).
        drop_prob: Probability of dropping each non-identity path per sample in training
            (stochastic paths, section 4). Kept paths are scaled by ``1 / (1 - drop_prob)``.

    Raises:
        ValueError: For a malformed expression or a letter without a block.

    """

    # Eager-only views of the unit; TorchScript would otherwise compile every property.
    __jit_unused_properties__ = ["expression", "num_block_evals", "scale", "drop_prob"]
    # Declared so that TorchScript keeps the steps' field names (it would infer plain tuples).
    plan: list[PlanStep]

    def __init__(
        self,
        expression: str,
        block: BlockFactory | Mapping[str, nn.Module | BlockFactory],
        scale: float = 0.3,
        sharing: Sharing = "full",
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        drop_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if sharing not in SHARINGS:
            raise ValueError(f"sharing must be one of {', '.join(SHARINGS)}; got {sharing!r}")
        self.polynomial: Polynomial = parse(resolve_expression(expression))
        self.sharing = sharing
        # The scale also lives in a tensor: a float would be a constant of a compiled graph, and
        # units that differ only in scale (the released model's decaying scales) would each
        # compile their own. Not persistent: the released weights have no such entry.
        self.register_buffer("scale_factor", torch.tensor(float(scale)), persistent=False)
        # The drop probability too: stochastic paths rise linearly over the units, and a float
        # per unit would compile a graph per unit. Only whether paths drop at all is plain.
        self.register_buffer("drop_rate", torch.tensor(float(drop_prob)), persistent=False)
        self.drops = False
        self.scale = scale
        self.drop_prob = drop_prob
        self.blocks = nn.ModuleDict(
            {letter: self._make_block(letter, block) for letter in self.polynomial.letters}
        )
        self.act = act_layer()
        self.plan = list(self.polynomial.plan())
        # What the forward pass needs of the polynomial and the sharing mode, as plain values
        # that TorchScript can read.
        self.num_paths = len(self.polynomial.terms)
        self.per_order = sharing in PER_ORDER_SHARINGS
        self.act_between = sharing == "released"

    def _make_block(
        self, letter: str, block: BlockFactory | Mapping[str, nn.Module | BlockFactory]
    ) -> nn.Module:
        if isinstance(block, Mapping):
            if letter not in block:
                raise ValueError(
                    f"bad polynomial {self.polynomial.text!r}: letter {letter!r} has no block; "
                    f"blocks given for {sorted(block)}"
                )
            made = block[letter]
            if isinstance(made, nn.Module):
                return made
        else:
            made = block
        if self.sharing == "released":
            return made(num_orders=self.polynomial.num_orders(letter))
        if self.sharing == "norms":
            return made(num_orders=self.polynomial.num_orders(letter), share_projection=True)
        return made()

    @property
    def expression(self) -> str:
        """The polynomial in canonical form."""
        return str(self.polynomial)

    @property
    def num_block_evals(self) -> int:
        """Blocks evaluated by ``forward`` (one per distinct path suffix)."""
        return len(self.plan)

    @property
    def scale(self) -> float:
        """Residual scale of every non-identity path (the paper's beta)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = float(value)
        with torch.no_grad():
            self.scale_factor.fill_(self._scale)

    @property
    def drop_prob(self) -> float:
        """Per-sample drop probability of every non-identity path in training."""
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"path drop probability must be in [0, 1), got {value}")
        self._drop_prob = float(value)
        self.drops = value > 0.0
        with torch.no_grad():
            self.drop_rate.fill_(self._drop_prob)

    def _run_block(self, letter: str, order: int, h: torch.Tensor, inner: bool) -> torch.Tensor:
        if inner and self.act_between:
            h = self.act(h)
        # TorchScript indexes a ModuleDict by literal keys only, so the block is found by a
        # loop over the (few) letters, which it unrolls.
        for name, block in self.blocks.items():
            if name == letter:
                return block(h, order) if self.per_order else block(h)
        raise KeyError(f"no block for the letter {letter}")

    def _path_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample keep mask over the paths, pre-scaled for inverted dropout, or None."""
        if not self.training or not self.drops:
            return None
        keep = (1.0 - self.drop_rate).to(x.dtype)
        shape = (self.num_paths, x.shape[0], 1, 1, 1)
        return (torch.rand(shape, device=x.device) < keep).to(x.dtype).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cascaded evaluation: ``act(x + scale * sum of path outputs)``, each suffix once."""
        mask = self._path_weight(x)
        outputs: list[torch.Tensor] = []
        residual: torch.Tensor | None = None
        path = 0
        for step in self.plan:  # cascaded: each distinct suffix once
            h = x if step.parent < 0 else outputs[step.parent]
            y = self._run_block(step.letter, step.order, h, step.parent >= 0)
            outputs.append(y)
            if step.is_path_end:
                term = y if mask is None else y * mask[path]
                residual = term if residual is None else residual + term
                path += 1
        assert residual is not None
        return self.act(x + self.scale_factor * residual)

    def forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        """Reference evaluation: every path of the polynomial computed from scratch.

        Stochastic paths are not applied here; compare in eval mode.
        """
        residual = torch.zeros_like(x)
        for path in self.polynomial.paths():
            h = x
            for i, (letter, order) in enumerate(path):
                h = self._run_block(letter, order, h, i > 0)
            residual = residual + h
        return self.act(x + self.scale * residual)

    def extra_repr(self) -> str:
        """The polynomial, scale, sharing, block evaluations and drop probability."""
        return (
            f"{self.expression!r}, scale={self.scale}, sharing={self.sharing!r}, "
            f"block_evals={self.num_block_evals}, drop_prob={self._drop_prob}"
        )
