"""``{all: [...]}`` (intersection), ``{any: [...]}`` (union) and ``{not: m}`` (complement)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from attncc.ir.masks.base import Mask, MaskError, Tensor, register
from attncc.ir.masks.full import Full

_LIST = {"type": "array", "items": {"$ref": "#/$defs/Mask"}, "minItems": 1}


def _items(key: str, arg, path, child) -> tuple[Mask, ...]:
    if not isinstance(arg, list) or not arg:
        raise MaskError(f"'{key}' takes a non-empty list of masks", path)
    return tuple(child(x, path + (i,)) for i, x in enumerate(arg))


#: how ``all`` and ``any`` join their children: the Triton operator, the kernel-name separator
#: and the tensor operation
_JOINS: dict[str, tuple[str, str, Callable[[Tensor, Tensor], Tensor]]] = {
    "all": ("&", "_", operator.and_),
    "any": ("|", "_or_", operator.or_),
}


class _Junction(Mask):
    """``all`` / ``any`` of ``items``: the dense masks, the bounds and the Triton predicates of the
    children joined as :data:`_JOINS` says."""

    items: tuple[Mask, ...]
    distance_only: ClassVar[bool] = True

    def children(self):
        return self.items

    def dense(self, h, q, kv, q_len, kv_len):
        op = _JOINS[self.kind][2]
        out = self.items[0].dense(h, q, kv, q_len, kv_len)
        for m in self.items[1:]:
            out = op(out, m.dense(h, q, kv, q_len, kv_len))
        return out

    def bounds(self, qb, kb, h):
        op = _JOINS[self.kind][2]
        may, must = self.items[0].bounds(qb, kb, h)
        for m in self.items[1:]:
            a, b = m.bounds(qb, kb, h)
            may, must = op(may, a), op(must, b)
        return may, must

    def triton(self):
        return "(" + f" {_JOINS[self.kind][0]} ".join(m.triton() for m in self.items) + ")"

    def to_spec(self):
        return {self.kind: [m.to_spec() for m in self.items]}

    @property
    def name(self):
        return _JOINS[self.kind][1].join(m.name for m in self.items)


@register("all", "intersection", _LIST, lambda arg, path, child: All(_items("all", arg, path, child)))
@dataclass(frozen=True)
class All(_Junction):
    items: tuple[Mask, ...]
    kind: ClassVar[str] = "all"


@register("any", "union", _LIST, lambda arg, path, child: Any_(_items("any", arg, path, child)))
@dataclass(frozen=True)
class Any_(_Junction):
    items: tuple[Mask, ...]
    kind: ClassVar[str] = "any"


@register("not", "complement", {"$ref": "#/$defs/Mask"}, lambda arg, path, child: Not(child(arg, path)))
@dataclass(frozen=True)
class Not(Mask):
    item: Mask
    kind: ClassVar[str] = "not"
    distance_only: ClassVar[bool] = True

    def children(self):
        return (self.item,)

    def dense(self, h, q, kv, q_len, kv_len):
        return ~self.item.dense(h, q, kv, q_len, kv_len)

    def bounds(self, qb, kb, h):
        may, must = self.item.bounds(qb, kb, h)
        return ~must, ~may

    def triton(self):
        return f"(~{self.item.triton()})"

    def to_spec(self):
        return {"not": self.item.to_spec()}

    @property
    def name(self):
        return f"not_{self.item.name}"


#: the empty mask (no pair allowed), as a node the algebra already has
EMPTY: Mask = Not(Full())


def conj(*masks: Mask | None) -> Mask:
    """Intersection, flattening nested ``all`` and dropping ``full``."""
    items: list[Mask] = []
    for m in masks:
        if m is None or isinstance(m, Full):
            continue
        for x in m.items if isinstance(m, All) else (m,):
            if x not in items:
                items.append(x)
    if not items:
        return Full()
    return items[0] if len(items) == 1 else All(tuple(items))
