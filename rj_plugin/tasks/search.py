"""The radius search of the certification tasks (spec section 5a, ``utils.binary_search``).

Find the largest radius R for which a (monotone in practice, but not assumed) test passes:

* start at ``start``;
* on success multiply by 10 until a failure is seen (or ``max_radius`` is reached);
* on failure divide by 10 until a success is seen;
* then bisect between the largest success and the smallest failure;
* stop when ``hi - lo <= tolerance`` or after ``steps`` evaluations;
* return the largest radius that passed (0 if none did).

Only radii that were actually tested and passed are ever returned, so the result is as sound as
the test itself whatever the shape of the test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SearchResult:
    """Outcome of :func:`largest_radius`.

    Attributes:
        radius: the largest radius that passed (0.0 if none).
        failed: the smallest radius that failed (inf if none).
        evaluations: ``(radius, passed)`` per test, in order.
    """

    radius: float
    failed: float
    evaluations: list[tuple[float, bool]] = field(default_factory=list)


def largest_radius(test: Callable[[float], bool], start: float, *, steps: int = 15,
                   tolerance: float = 1e-5, max_radius: float = 1e5) -> SearchResult:
    """Largest radius in ``(0, max_radius]`` for which ``test`` passed (see the module doc)."""
    if not start > 0:
        raise ValueError(f"the search needs a start radius > 0, got {start}")
    res = SearchResult(0.0, math.inf)
    r = min(start, max_radius)
    for _ in range(steps):
        ok = bool(test(r))
        res.evaluations.append((r, ok))
        if ok:
            res.radius = max(res.radius, r)
        else:
            res.failed = min(res.failed, r)
        if math.isinf(res.failed):  # no failure yet: grow
            if r >= max_radius:
                break
            r = min(10 * r, max_radius)
        elif res.radius == 0.0:  # no success yet: shrink
            r = r / 10
        else:
            if res.failed - res.radius <= tolerance:
                break
            r = (res.radius + res.failed) / 2
    return res
