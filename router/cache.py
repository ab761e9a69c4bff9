"""Score cache: re-runs over a dataset skip captions already scored.

Keyed by (model id + the scorer's backend and dtype, prompt version, caption). What is stored is the model's raw output (digit
distribution and flag probabilities), not the final score, so changing the
:class:`~router.scores.CombinationRule` never needs a re-score. SQLite (standard library) because
it is one file, safe to append to from several runs, and indexed by key.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from router.scores import PROMPT_VERSION, ComplexityScorer

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    model_id TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    caption TEXT NOT NULL,
    raw TEXT NOT NULL,
    PRIMARY KEY (model_id, prompt_version, caption)
)
"""


class ScoreCache:
    """SQLite table of raw scores. ``path`` is created (with parents) if missing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self.path}: not a usable score cache ({error})") from error

    def get_many(self, model_id: str, captions: list[str]) -> dict[str, tuple[list[float], dict[str, float]]]:
        found = {}
        for caption in dict.fromkeys(captions):
            row = self._db.execute(
                "SELECT raw FROM scores WHERE model_id=? AND prompt_version=? AND caption=?",
                (model_id, PROMPT_VERSION, caption),
            ).fetchone()
            if row is not None:
                data = json.loads(row[0])
                found[caption] = (data["distribution"], data["flags"])
        return found

    def put_many(self, model_id: str, items: dict[str, tuple[list[float], dict[str, float]]]) -> None:
        rows = [
            (model_id, PROMPT_VERSION, caption, json.dumps({"distribution": dist, "flags": flags}))
            for caption, (dist, flags) in items.items()
        ]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def cache_key(scorer: ComplexityScorer) -> str:
    """The model column of a scorer's cache rows: its id and numerics (a bf16 score is not an fp32 one)."""
    return f"{scorer.model_id} [{scorer.numerics}]"


class CachedScorer(ComplexityScorer):
    """Wraps a scorer: cached captions skip the model; new ones are scored once and stored.

    Args:
        scorer: the scorer that runs the model.
        cache: a :class:`ScoreCache` or a path to its SQLite file.
    """

    def __init__(self, scorer: ComplexityScorer, cache: ScoreCache | str | Path):
        self.inner = scorer
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.model_id = scorer.model_id
        self.rule = scorer.rule
        self.numerics = scorer.numerics
        self._key = cache_key(scorer)
        self.hits = 0
        self.misses = 0

    def score_raw(self, captions: list[str]) -> list[tuple[list[float], dict[str, float]]]:
        known = self.cache.get_many(self._key, captions)
        missing = [c for c in dict.fromkeys(captions) if c not in known]
        self.hits += sum(1 for c in captions if c in known)
        self.misses += len(missing)
        if missing:
            fresh = dict(zip(missing, self.inner.score_raw(missing)))
            self.cache.put_many(self._key, fresh)
            known.update(fresh)
        return [known[c] for c in captions]
