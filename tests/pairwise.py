"""All-pairs case generation: every pair of values of any two factors appears in at least one case, in far
fewer cases than the full product."""
from __future__ import annotations

import itertools


def all_pairs(factors: dict[str, list], valid=lambda case: True) -> list[dict]:
    """Greedy all-pairs over ``factors`` (name -> values), keeping only cases for which ``valid`` holds.
    Deterministic: the same factors give the same cases."""
    names = list(factors)
    candidates = [dict(zip(names, values)) for values in itertools.product(*factors.values())]
    candidates = [case for case in candidates if valid(case)]

    def pairs(case):
        return {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(case) for case in candidates))
    cases = []
    while uncovered:
        best = max(candidates, key=lambda case: len(pairs(case) & uncovered))
        cases.append(best)
        uncovered -= pairs(best)
    return cases


def case_id(case: dict) -> str:
    return "-".join(f"{k}={getattr(v, '__name__', None) or str(v).replace('torch.', '')}" for k, v in case.items())
