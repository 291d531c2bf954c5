"""OLMo's repetition filter: an instance in which some 1..13-token pattern repeats back to back at
least 32 times gets all of its labels masked (OLMoE trained with this instance filter).

A pattern of period p repeats k times consecutively over a span of k*p tokens where every token
equals the one p positions earlier. So the test is: for some p, a run of at least (k-1)*p
consecutive positions i with x[i] == x[i+p]. That is exact and needs one vectorised pass per period.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_PERIOD = 13
DEFAULT_MIN_REPEATS = 32


def has_repeated_ngram(tokens: np.ndarray, *, max_period: int = DEFAULT_MAX_PERIOD,
                       min_repeats: int = DEFAULT_MIN_REPEATS, min_period: int = 1) -> bool:
    """True when some pattern of `min_period`..`max_period` tokens repeats >= `min_repeats` times in a row."""
    tokens = np.asarray(tokens)
    for period in range(min_period, max_period + 1):
        if tokens.shape[0] < min_repeats * period:
            break
        same = tokens[period:] == tokens[:-period]
        needed = (min_repeats - 1) * period
        # A run of `needed` True positions exists iff some window of that width sums to `needed`.
        csum = np.concatenate(([0], np.cumsum(same, dtype=np.int64)))
        if int((csum[needed:] - csum[:-needed]).max()) >= needed:
            return True
    return False
