"""One line per mask primitive: its spec form for a sequence of ``n`` tokens.

Every test that must cover every primitive takes its masks from here: the Triton predicates
against the dense reference, exact block classification, the forward kernel and the CPU
executor against the reference, gradients, spec round trips and the JSON schema. A case id is
``<primitive>`` or ``<primitive>/<variant>``; ``test_every_primitive_has_a_case`` fails when a
registered primitive has no line here, so a new primitive is its file, its docs entry and a line
below.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from attncc.ir import masks as M
from attncc.spec import parse_mask


def grid(n: int) -> list[int]:
    """The most cubic T x H x W grid (T <= H <= W) holding exactly ``n`` tokens."""
    best = [1, 1, n]
    for t in range(1, n + 1):
        for h in range(t, n + 1):
            if n % (t * h) == 0 and n // (t * h) >= h and max(t, h, n // (t * h)) < max(best):
                best = [t, h, n // (t * h)]
    return best


def odd_at_most(g: int, k: int) -> int:
    """The largest odd kernel size <= min(g, k)."""
    m = min(g, k)
    return m if m % 2 else max(1, m - 1)


#: id -> spec node of a mask for ``n`` tokens (dynamic ones are marked by the primitive itself)
CASES: dict[str, Callable[[int], object]] = {
    "full": lambda n: "full",
    "causal": lambda n: "causal",
    "window": lambda n: {"window": max(1, n // 5)},
    "window/before_after": lambda n: {"window": {"before": n // 8, "after": n // 6}},
    "sink": lambda n: {"sink": max(1, n // 16)},
    "prefix": lambda n: {"prefix": max(1, n // 3)},
    "global": lambda n: {"global": max(1, n // 20)},
    "chunk": lambda n: {"chunk": max(1, n // 3)},
    "chunk/shift": lambda n: {"chunk": {"size": max(2, n // 3), "shift": max(2, n // 3) // 2}},
    "block_causal": lambda n: {"block_causal": max(1, n // 6)},
    "strided": lambda n: {"strided": 5},
    "power": lambda n: {"power": 4},
    "random_blocks": lambda n: {"random_blocks": {"n": 2, "seed": 3, "block": 16}},
    "tile3d": lambda n: {"tile3d": {"grid": grid(n), "window": [0, 1, 1]}},
    "tile3d/text_start": lambda n: {
        "tile3d": {"grid": grid(n - n // 5), "window": [0, 1, 1], "text": {"tokens": n // 5, "at": "start"}}
    },
    "tile3d/text_end": lambda n: {
        "tile3d": {"grid": grid(n - n // 7), "window": [1, 0, 1], "text": {"tokens": n // 7, "at": "end"}}
    },
    "neighborhood": lambda n: {
        "neighborhood": {"grid": grid(n), "kernel": [odd_at_most(g, k) for g, k in zip(grid(n), (1, 3, 5))]}
    },
    "all": lambda n: {"all": ["causal", {"any": [{"sink": 2}, {"window": max(1, n // 6)}]}]},
    "any": lambda n: {"any": [{"prefix": max(1, n // 4)}, "causal"]},
    "not": lambda n: {"not": {"window": max(1, n // 8)}},
    "topk": lambda n: {"all": ["causal", {"any": [{"window": 16}, {"topk": {"k": 2, "block": 16}}]}]},
    "threshold": lambda n: {"all": ["causal", {"threshold": {"tau": 0.5, "block": 16}}]},
    "vertical_slash": lambda n: {
        "all": [
            "causal",
            {"vertical_slash": {"vertical": 4, "slash": 4, "last_q": 8, "keep_first": 1, "keep_recent": 2}},
        ]
    },
}


def primitive_of(case: str) -> str:
    return case.split("/")[0]


def mask(case: str, n: int) -> M.Mask:
    """The mask of ``case`` for ``n`` tokens."""
    return parse_mask(CASES[case](n), {})


def static_cases() -> list[str]:
    """The cases without a data-dependent selector (they have a dense mask and a block table)."""
    return [c for c in CASES if not mask(c, 64).is_dynamic]


def params(cases: list[str] | None = None):
    """``pytest.param`` per case, with the case id."""
    return [pytest.param(c, id=c) for c in (cases if cases is not None else list(CASES))]
