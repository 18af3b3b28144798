"""Dtypes by name: the plan's dtype names, their torch dtypes, Triton element types and the
spellings the command line accepts. Every other module looks dtypes up here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DTypeName = Literal["float32", "float16", "bfloat16", "float64"]


@dataclass(frozen=True)
class DType:
    name: DTypeName
    torch: torch.dtype
    #: Triton pointer element type; None: no Triton kernel takes this dtype
    triton: str | None
    #: other spellings (command line)
    aliases: tuple[str, ...] = ()


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", torch.float32, "fp32", ("fp32",)),
        DType("float16", torch.float16, "fp16", ("fp16", "half")),
        DType("bfloat16", torch.bfloat16, "bf16", ("bf16",)),
        DType("float64", torch.float64, None, ("fp64", "double")),
    )
}
#: every accepted spelling -> plan dtype name
SPELLINGS: dict[str, DTypeName] = {s: d.name for d in DTYPES.values() for s in (d.name, *d.aliases)}


def dtype_name(dtype: torch.dtype | str) -> DTypeName:
    """The plan dtype name of a torch dtype or a spelling ('bf16', 'float16', ...); ValueError if none."""
    if isinstance(dtype, torch.dtype):
        for d in DTYPES.values():
            if d.torch == dtype:
                return d.name
        raise ValueError(f"dtype {dtype} is not supported; expected one of {', '.join(DTYPES)}")
    if dtype not in SPELLINGS:
        raise ValueError(f"unknown dtype '{dtype}'; expected one of {', '.join(SPELLINGS)}")
    return SPELLINGS[dtype]
