"""A study's results: one small JSON file per config and seed, shared by every job of a study.

``OUT/results/<config>_s<seed>.json`` holds what one training run of one config and seed gave
(accuracy, costs, times, the recipe it was trained with). It is written atomically once the
run is evaluated, so the folder is at any moment the set of finished pairs: a killed study
resumes from it, jobs that split a study (``--shard``) land their pairs in it, and a report
merges whatever it holds. The files are small and carry no weights, so the folder can be
committed to git as results land and a study resumed from the committed copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polynet.ablation.studies import Study
from polynet.errors import UserError
from polynet.io.checkpoint import atomic_write

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# What differs between the pairs of one study; every other recipe setting must be equal.
PAIR_KEYS = ("model", "model_kwargs", "seed")


def fingerprint(payload: Any) -> str:
    """A short hash of a JSON-able payload (key order does not matter)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON atomically (a crash leaves the old file or the new one)."""
    text = json.dumps(payload, indent=1, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (where the platform has one).

    Jobs on one machine that share a study folder land a result and run its ``--on-result``
    command (a ``git add`` and ``git commit``) inside it, one job at a time: otherwise one job's
    ``git add`` takes another's fresh result into its own commit, and the other's commit then
    finds nothing to commit. The lock is on the folder itself, so nothing is created in it.
    """
    if fcntl is None:  # Windows: no flock; jobs there land unserialised
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def pair_key(config: str, seed: int) -> str:
    """The file stem of one config and seed: ``<config>_s<seed>``."""
    return f"{config}_s{seed}"


def seed_of(key: str) -> int:
    """The seed of a ``<config>_s<seed>`` key."""
    return int(key.rpartition("_s")[2])


def _differs(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str] = ()) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in keys and a.get(k) != b.get(k))


@dataclass
class Collected:
    """The results found for a study's expected pairs.

    Attributes:
        rows: One result per finished pair, seed-major in study order.
        missing: ``<config>_s<seed>`` of every expected pair without a result.

    """

    rows: list[dict[str, Any]]
    missing: list[str]


class ResultStore:
    """The folder of a study's result files (the cache every job reads and writes).

    Args:
        folder: Where ``<config>_s<seed>.json`` files live.

    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        """The file of one pair."""
        return self.folder / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """The saved result of one pair, or None when it has none yet."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path} is not a readable result ({err.msg}); delete it to train that pair again"
            ) from None

    def save(self, row: dict[str, Any]) -> Path:
        """Write one pair's result; return its file."""
        path = self.path(pair_key(row["config"], row["seed"]))
        write_json(path, row)
        return path

    def check(self, saved: dict[str, Any], identity: dict[str, Any]) -> None:
        """Refuse a saved result made with another recipe than ``identity``.

        Raises:
            UserError: Naming the settings that differ (saved and now) and the fixes.

        """
        if saved.get("fingerprint") == fingerprint(identity):
            return
        recipe = saved.get("recipe", {})
        shown = ", ".join(
            f"{k} (saved {recipe.get(k)!r}, now {identity.get(k)!r})"
            for k in _differs(identity, recipe)
        )
        config = saved.get("config", "?")
        raise UserError(
            f"{self.path(pair_key(config, saved.get('seed', 0)))} was made with a different "
            f"recipe (differs in {shown or 'model'}); pass the settings it was made with, "
            f"retrain it with --rerun --configs {config} (--rerun alone retrains every config) "
            "or choose another --out"
        )

    def seeds_found(self, study: Study) -> list[int]:
        """Seeds that some config of ``study`` has a result for."""
        names = {c.name for c in study.configs}
        seeds = set()
        for path in self.folder.glob("*_s*.json"):
            config, _, seed = path.stem.rpartition("_s")
            if config in names and seed.isdigit():
                seeds.add(seed_of(path.stem))
        return sorted(seeds)

    def collect(self, study: Study, seeds: Sequence[int]) -> Collected:
        """Every result of ``study``'s configs for ``seeds``; the pairs without one as missing.

        Raises:
            UserError: When the results were made with different recipes (a study compares
                networks under one recipe, never a mixture).

        """
        rows, missing = [], []
        for seed in seeds:
            for config in study.configs:
                key = pair_key(config.name, seed)
                row = self.load(key)
                if row is None:
                    missing.append(key)
                else:
                    rows.append(row)
        for row in rows[1:]:
            keys = _differs(rows[0].get("recipe", {}), row.get("recipe", {}), PAIR_KEYS)
            if keys:
                a = pair_key(rows[0]["config"], rows[0]["seed"])
                b = pair_key(row["config"], row["seed"])
                raise UserError(
                    f"results in {self.folder} were made with different recipes ({a} and {b} "
                    f"differ in {', '.join(keys)}); keep one recipe's results in a folder (move "
                    "the others away, or retrain them with --rerun --configs NAME)"
                )
        return Collected(rows, missing)
