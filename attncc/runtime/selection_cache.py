"""Selections kept across calls (``reuse: {dense_first: K, refresh_every: N}``, SparseD).

The state lives here, outside every traced graph: a rewritten site calls the op
``attncc::attention_cached`` with the cache's key and its own site key (strings), and the op
reads and updates the entry at run time. Dynamo never sees the entry (the op is inserted by the
backend after tracing and is opaque to inductor), so its call counter and stored selection
install no guards: changing phase (dense -> select -> reuse) or resetting causes no recompile.

Per site and per call ``c`` (0-based, counted since the last reset):

* ``c < dense_first``: the model's own mask only (no selection);
* ``c >= dense_first``: the selection is computed when ``(c - dense_first) % refresh_every == 0``
  (only at ``c == dense_first`` without ``refresh_every``), or when the stored one does not fit
  the inputs (batch, heads, query blocks or device changed, or fewer keys); otherwise the stored
  one is reused, widened with unselected blocks when the keys grew (decoding over a cache: the
  new blocks were not candidates when it was computed, the static parts of the mask cover them).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch

_IDS = itertools.count()
_CACHES: dict[str, SelectionCache] = {}
_LOCK = threading.Lock()


@dataclass
class SiteState:
    """One site's call reuse state: calls since reset, the stored selection ``[B, H, nq, nk]``
    (kernel blocks) and how many times it was computed since reset."""

    calls: int = 0
    selected: torch.Tensor | None = None
    refreshes: int = 0


class SelectionCache:
    """Call-reuse state of every site compiled with it, by site key (module path and occurrence).

    Pass one per compiled model (``options={"selection_cache": cache}``) when several models
    with call reuse run in one process; otherwise they share :func:`default_selection_cache`
    and sites with the same module path share state."""

    def __init__(self) -> None:
        self.key = f"selection-cache-{next(_IDS)}"
        self._sites: dict[str, SiteState] = {}
        with _LOCK:
            _CACHES[self.key] = self

    def site(self, site_key: str) -> SiteState:
        """The state of ``site_key`` (created on first use)."""
        with _LOCK:
            return self._sites.setdefault(site_key, SiteState())

    def reset(self, site_key: str | None = None) -> None:
        """Forget the call counts and stored selections (of one site, or of all): the next
        call of each site is call 0 again (dense for ``dense_first`` calls)."""
        with _LOCK:
            if site_key is None:
                self._sites.clear()
            else:
                self._sites.pop(site_key, None)

    def state(self) -> dict[str, tuple[int, int]]:
        """``{site key: (calls, refreshes)}`` since the last reset."""
        with _LOCK:
            return {k: (s.calls, s.refreshes) for k, s in self._sites.items()}

    def __repr__(self) -> str:
        return f"SelectionCache({self.key}, sites={sorted(self._sites)})"


_DEFAULT: SelectionCache | None = None


def default_selection_cache() -> SelectionCache:
    """The process-wide cache used when no ``selection_cache`` option is given."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SelectionCache()
    return _DEFAULT


def get_cache(key: str) -> SelectionCache:
    """The cache registered under ``key`` (the string a compiled graph carries)."""
    try:
        return _CACHES[key]
    except KeyError:
        raise KeyError(f"no attncc selection cache '{key}' in this process") from None


def reset_selection(cache: SelectionCache | None = None) -> None:
    """Reset call reuse: every site compiled with ``cache`` (default: the process-wide cache)
    starts again at call 0. Takes effect on the next call; nothing recompiles."""
    if cache is None:
        cache = default_selection_cache()
    if not isinstance(cache, SelectionCache):
        raise TypeError(
            f"reset_selection takes an attncc.SelectionCache (the one passed as "
            f"options['selection_cache']) or None for the default, got {type(cache).__name__}"
        )
    cache.reset()
