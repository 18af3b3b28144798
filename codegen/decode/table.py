"""The decode table: for a call with few queries (decoding, speculative verification, chunks of a
chunked prefill), the kv blocks each kv head's queries visit, listed once for all its query heads.

All ``q_len`` queries of a call form one query block, and under GQA the ``GROUP`` query heads
of a kv head are packed into one tile of ``GROUP * q_len`` rows, so a program loads each k/v
block once for all of them. A kv block is *full* for a kv head when it is full for every
program of its query heads (the predicate is skipped), *partial* when some pair is allowed but
not all (the predicate decides per row, with the row's own program), and skipped otherwise.
Labels come from :func:`attncc.ir.blocks.query_row_labels`: O(kv blocks) bounds per program,
never S x S. Consecutive decode steps are labelled ``STEPS_PER_BATCH`` at a time (one batched
classification per program), so a step's table costs a row lookup: steps that append to the
keys (queries at the end) by key length, steps over a fixed-length static cache by query offset.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from attncc.ir.blocks import EMPTY, FULL, query_row_labels
from attncc.ir.plan import AttentionPlan

_LOCK = threading.Lock()
#: a call takes the decode path when it has at most this many queries and its packed rows (query
#: heads per kv head x queries) fit one tile of at most ``MAX_ROWS`` rows
MAX_QUERIES = 16
MAX_ROWS = 64


def decode_rows(plan: AttentionPlan) -> int:
    """Rows of a kv head's packed query tile: ``GROUP * q_len``."""
    return plan.gqa_group * plan.q_len


def unsupported(plan: AttentionPlan) -> str | None:
    """Why the plan does not take the decode path (None: it does)."""
    if plan.is_dynamic:
        return "it selects blocks from the data at run time"
    if plan.permute is not None or plan.runtime_key_order:
        return "its tokens are permuted"
    if plan.mask_kind == "documents":
        return "it attends over packed documents (block tables per batch element)"
    if plan.q_len == 0 or plan.kv_len == 0:
        return "it has no queries or no keys"
    if plan.q_len > MAX_QUERIES:
        return f"it has {plan.q_len} queries (the decode path takes at most {MAX_QUERIES})"
    if decode_rows(plan) > MAX_ROWS:
        return f"{plan.gqa_group} query heads per kv head x {plan.q_len} queries exceed {MAX_ROWS} rows"
    return None


@dataclass(frozen=True)
class DecodeTable:
    """Per kv head: the full and the partial kv blocks (ascending), padded to a common width."""

    full_num: torch.Tensor  # [Hkv] int32
    full_idx: torch.Tensor  # [Hkv, Wf] int32
    part_num: torch.Tensor  # [Hkv] int32
    part_idx: torch.Tensor  # [Hkv, Wp] int32
    block_kv: int
    #: kv heads whose lists are equal, ascending (they run as one batch)
    classes: tuple[tuple[int, ...], ...]
    #: the longest full and partial lists (host ints: launches read them without a device sync)
    most_full: int
    most_partial: int

    def to(self, device) -> DecodeTable:
        """The table on ``device``. To a GPU it travels as one packed copy from pinned memory,
        issued asynchronously: building a decode step's table never waits for the device."""
        device = torch.device(device)
        parts = (self.full_num, self.full_idx, self.part_num, self.part_idx)
        if device.type == "cuda":
            packed = torch.cat([t.reshape(-1) for t in parts]).pin_memory().to(device, non_blocking=True)
            moved, start = [], 0
            for t in parts:
                moved.append(packed[start : start + t.numel()].view(t.shape))
                start += t.numel()
        else:
            moved = [t.to(device) for t in parts]
        fn, fi, pn, pi = moved
        return DecodeTable(fn, fi, pn, pi, self.block_kv, self.classes, self.most_full, self.most_partial)

    def visited(self) -> torch.Tensor:
        """[Hkv] kv blocks each kv head visits."""
        return self.full_num.long() + self.part_num.long()


def _pad(lists: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    num = torch.tensor([x.numel() for x in lists], dtype=torch.int32)
    idx = torch.zeros(len(lists), max(1, int(num.max()) if lists else 1), dtype=torch.int32)
    for i, x in enumerate(lists):
        idx[i, : x.numel()] = x.to(torch.int32)
    return num, idx


#: decode steps labelled by one batched classification
STEPS_PER_BATCH = 64
_steps: dict[tuple, tuple[int, torch.Tensor]] = {}
_STEPS_MAX = 256


def step_labels(plan: AttentionPlan, program: int) -> torch.Tensor:
    """``[ceil(kv_len / block_kv)]`` labels of the plan's call for mask program ``program``, from
    a batch of consecutive steps. Steps that append (``q_offset = kv_len - q_len``) are batched
    by key length: blocks past a step's own keys are cut, and a block that straddles its end is
    labelled with the keys of the batch's longest step, which only ever turns FULL into PARTIAL
    (the kernels mask keys past ``KV_LEN`` themselves). Steps over fixed-length keys are batched
    by query offset, exactly. A predicate that reads the lengths is labelled alone."""
    prog, head = plan.programs[program], plan.program_heads()[program]
    q_len, kv_len, bk = plan.q_len, plan.kv_len, plan.block_kv
    nk = -(-kv_len // bk)
    if prog.reads_lengths:
        return query_row_labels(prog, head, q_len, kv_len, plan.q_offset, bk)[0]
    appends = plan.q_offset == kv_len - q_len
    key = (prog, head, q_len, bk) + (("end",) if appends else ("fixed", kv_len))
    step = kv_len if appends else plan.q_offset
    with _LOCK:
        hit = _steps.get(key)
    if hit is None or not hit[0] <= step < hit[0] + hit[1].shape[0]:
        if appends:
            steps = range(kv_len, kv_len + STEPS_PER_BATCH)
            labels = query_row_labels(prog, head, q_len, steps[-1], [n - q_len for n in steps], bk)
        else:
            labels = query_row_labels(prog, head, q_len, kv_len, list(range(step, step + STEPS_PER_BATCH)), bk)
        hit = (step, labels)
        with _LOCK:
            if len(_steps) >= _STEPS_MAX:
                _steps.clear()
            _steps[key] = hit
    return hit[1][step - hit[0], :nk]


def build_decode_table(plan: AttentionPlan) -> DecodeTable:
    """The decode table of a plan that takes the decode path (:func:`unsupported` is None)."""
    labels = [step_labels(plan, i) for i in range(len(plan.programs))]
    g = plan.gqa_group
    by_programs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    classes: dict[tuple[int, ...], list[int]] = {}
    full, part = [], []
    for kvh in range(plan.num_kv_heads):
        progs = tuple(sorted(set(plan.head_to_program[kvh * g : (kvh + 1) * g])))
        classes.setdefault(progs, []).append(kvh)
        hit = by_programs.get(progs)
        if hit is None:
            lab = torch.stack([labels[p] for p in progs])
            visited = (lab != EMPTY).any(0)
            is_full = (lab == FULL).all(0)
            hit = by_programs[progs] = (is_full.nonzero().flatten(), (visited & ~is_full).nonzero().flatten())
        full.append(hit[0])
        part.append(hit[1])
    (fn, fi), (pn, pi) = _pad(full), _pad(part)
    classes_t = tuple(tuple(c) for c in classes.values())
    return DecodeTable(fn, fi, pn, pi, plan.block_kv, classes_t, int(fn.max()), int(pn.max()))


_tables: dict[tuple[AttentionPlan, str], DecodeTable] = {}
#: tables kept (decoding makes one per generated token and plan)
_TABLES_MAX = 1024


def decode_table(plan: AttentionPlan, device: torch.device | str = "cpu") -> DecodeTable:
    """The plan's decode table on ``device``, built once per (plan, device)."""
    key = (plan, str(device))
    with _LOCK:
        hit = _tables.get(key)
    if hit is None:
        hit = build_decode_table(plan)
        if torch.device(device).type != "cpu":
            hit = hit.to(device)
        with _LOCK:
            if len(_tables) >= _TABLES_MAX:
                _tables.clear()
            _tables[key] = hit
    return hit
