"""Block-map pictures: the RGB arrays of a plan's block map (static, or under a measured selection)
and the PNG that draws them (``attncc explain --png``, ``Report.draw``).

Colours: white empty blocks, orange partial blocks (allowed tokens darker when the map is small
enough to draw tokens), blue full blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attncc.codegen.selectors.layout import dense_selected_mask, layout
from attncc.ir import masks as M
from attncc.ir.blocks import EMPTY, FULL, PARTIAL, classify
from attncc.ir.plan import AttentionPlan

#: token-level detail is drawn up to this many (q, kv) pairs
TOKEN_PAIRS = 1024 * 1024
#: at most this many block maps in one picture
PANELS = 8

EMPTY_RGB = (1.0, 1.0, 1.0)
PARTIAL_RGB = (0.99, 0.82, 0.6)
#: an allowed token of a partial block (token-level pictures)
ALLOWED_RGB = (0.85, 0.4, 0.05)
FULL_RGB = (0.25, 0.45, 0.8)


@dataclass
class Panel:
    """One block map to draw: its RGB ``image`` (``[Sq, Skv, 3]`` tokens, or ``[nq, nk, 3]``
    blocks for long sequences), its block ``labels`` (``[nq, nk]``: EMPTY, PARTIAL, FULL) and a
    title."""

    image: torch.Tensor
    labels: torch.Tensor
    title: str
    extent: tuple[int, int, int, int] | None = None


def extent(plan: AttentionPlan) -> tuple[int, int, int, int] | None:
    """The axes' token extent of a block-level picture; None when tokens are drawn."""
    return None if plan.q_len * plan.kv_len <= TOKEN_PAIRS else (0, plan.kv_len, plan.q_len, 0)


def image(plan: AttentionPlan, labels: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """The RGB picture of block ``labels [nq, nk]``; with token detail when the sequence is short
    enough, ``allowed [Sq, Skv]`` (bool) marking the tokens partial blocks let through."""
    palette = torch.zeros(3, 3)
    for label, rgb in ((EMPTY, EMPTY_RGB), (PARTIAL, PARTIAL_RGB), (FULL, FULL_RGB)):
        palette[label] = torch.tensor(rgb)
    labels = labels.cpu().long()
    if extent(plan) is not None or allowed is None:
        return palette[labels]
    tokens = labels.repeat_interleave(plan.block_q, 0).repeat_interleave(plan.block_kv, 1)[: plan.q_len, : plan.kv_len]
    out = palette[tokens]
    out[(tokens == PARTIAL) & allowed.cpu()] = torch.tensor(ALLOWED_RGB)
    return out


def static_image(plan: AttentionPlan, program: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, labels)`` of one static program's block map, in kernel (permuted) order."""
    mask, head, order = plan.programs[program], plan.program_heads()[program], plan.order()
    q_len, kv_len = plan.q_len, plan.kv_len
    labels = classify(mask, q_len, kv_len, plan.block_q, plan.block_kv, head, order, order, plan.q_offset)
    allowed = None
    if extent(plan) is None:
        allowed = M.dense(mask, q_len, kv_len, heads=[head], q_offset=plan.q_offset)[0]
        if order is not None:
            allowed = allowed[order][:, order]
    return image(plan, labels, allowed), labels


def documents_image(plan: AttentionPlan, program: int, ids_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, labels)`` of one program over packed documents ``ids_row [Skv]``: the blocks the
    kernels visit (static map, less the block pairs whose documents do not meet), full where both
    blocks lie in one and the same document."""
    from attncc.ir.documents import block_overlap, block_ranges, same_document

    _, labels = static_image(plan, program)
    meet = block_overlap(ids_row, plan.q_len, plan.q_offset, plan.kv_len, plan.block_q, plan.block_kv)
    qlo, qhi = block_ranges(ids_row, plan.q_offset, plan.q_len, plan.block_q)
    klo, khi = block_ranges(ids_row, 0, plan.kv_len, plan.block_kv)
    one = (qlo == qhi)[:, None] & (klo == khi)[None, :] & (qlo[:, None] == klo[None, :])
    labels = torch.where(~meet, EMPTY, torch.where((labels == FULL) & ~one, PARTIAL, labels)).to(labels.dtype)
    allowed = None
    if extent(plan) is None:
        mask, head = plan.programs[program], plan.program_heads()[program]
        allowed = M.dense(mask, plan.q_len, plan.kv_len, heads=[head], q_offset=plan.q_offset)[0]
        allowed = allowed & same_document(ids_row[None], plan.q_len, plan.q_offset)[0, 0]
    return image(plan, labels, allowed), labels


def selected_image(plan: AttentionPlan, selected: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, labels)`` of one head of a data-dependent plan under the selection ``selected
    [H, nq, nk]`` (kernel blocks) one call made: the blocks of the mask where selected, of the
    rest of the program elsewhere, as the kernels ran them."""
    lay = layout(plan)
    program = plan.head_to_program[head]
    sel = selected[head].cpu()
    labels = torch.where(sel, lay.labels_sel[program], lay.labels_not[program])
    allowed = None
    if extent(plan) is None:
        allowed = dense_selected_mask(plan, selected[None].cpu())[0, head]
    return image(plan, labels, allowed), labels


def save(path: str, panels: Sequence[Panel], note: str | None = None) -> None:
    """Draw ``panels`` (at most :data:`PANELS`) into the PNG ``path``; ImportError without
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = list(panels)[:PANELS]
    cols = max(1, min(len(chosen), 4))
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel in zip(axes.flat, chosen):
        ax.imshow(panel.image.numpy(), interpolation="nearest", extent=panel.extent)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(panel.title, fontsize=7)
    if note:
        fig.suptitle(note, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
