"""Split a study's (config, seed) pairs over independent jobs that share one study folder.

``--shard K/N`` (1 <= K <= N) gives job K the pairs whose position ``p`` in the whole study,
``p = seed * len(study.configs) + config_index``, has ``p % N == K - 1``. The position
depends only on the study, not on ``--configs`` or ``--seeds``, so N jobs never train the
same pair, whatever part of the study each is asked for; consecutive positions go to
different jobs, so every job gets a mix of cheap and costly configs and seed 0 of every
config is done first. Job 1 also runs the timing pass (one pass on one machine is what
makes times comparable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from polynet.ablation.studies import Study
from polynet.errors import UserError


@dataclass(frozen=True)
class Shard:
    """Job ``index`` (1-based) of ``count`` jobs that split one study.

    Attributes:
        index: This job, 1 .. count.
        count: Jobs in all.

    """

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse ``K/N``.

        Raises:
            UserError: Unless ``text`` is ``K/N`` with whole numbers ``1 <= K <= N``.

        """
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        index, count = (int(match[1]), int(match[2])) if match else (0, 0)
        if not match or count < 1 or not 1 <= index <= count:
            raise UserError(
                f"--shard takes K/N, job K of N jobs with 1 <= K <= N (four jobs: --shard 1/4 "
                f"... --shard 4/4), got {text!r}"
            )
        return cls(index, count)

    @property
    def times(self) -> bool:
        """Whether this job runs the timing pass (the first job does)."""
        return self.index == 1

    def owns(self, study: Study, config: str, seed: int) -> bool:
        """Whether this job trains ``config`` with ``seed`` (``study``: the whole study)."""
        names = [c.name for c in study.configs]
        position = seed * len(names) + names.index(config)
        return position % self.count == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
