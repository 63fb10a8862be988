"""Cross-validation splits: nnU-Net's 5-fold KFold, shuffled with seed 12345 over sorted case ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import KFold

NUM_FOLDS = 5
SPLIT_SEED = 12345


def generate_splits(
    case_ids: Sequence[str], num_folds: int = NUM_FOLDS, seed: int = SPLIT_SEED
) -> list[dict]:
    """``[{"train": [...], "val": [...]}, ...]`` as nnU-Net's ``generate_crossval_split``.

    With fewer cases than folds, one fold per case (leave-one-out); with a single case, one
    fold that trains and validates on it (nnU-Net's ``fold == "all"``).
    """
    ids = sorted(case_ids)
    if len(ids) < 2:
        return [{"train": list(ids), "val": list(ids)}]
    folds = KFold(n_splits=min(num_folds, len(ids)), shuffle=True, random_state=seed)
    names = np.asarray(ids)
    return [{"train": names[train].tolist(), "val": names[val].tolist()} for train, val in folds.split(names)]
