"""Event counters in the spirit of inductor's: ``counters["detected"]``, ``["rewritten"]``, ``["skipped"]``."""

from __future__ import annotations

from collections import Counter

#: detected: attention sites found; rewritten: sites replaced by attncc::attention;
#: unbound: sites no spec rule matched (left as they were); skipped: attention-like
#: subgraphs that could not be canonicalized (reported with a reason); graphs: graphs compiled.
counters: Counter[str] = Counter()
