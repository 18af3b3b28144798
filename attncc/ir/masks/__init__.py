"""Mask algebra: predicates of (head, q, kv) over token positions, one file per primitive.

Importing this package registers every primitive in :data:`PRIMITIVES` (in the order the docs
and the JSON schema list them); a new primitive is a new file imported below, its docs entry
and one line in ``tests/mask_cases.py``.
"""

# ruff: noqa: I001

from attncc.ir.masks.base import (
    PRIMITIVES,
    Blocks,
    Mask,
    MaskError,
    Primitive,
    broadcast_shape,
    dense,
    format_spec,
)

# Registration order is the order the docs, the schema and error messages list primitives in:
# keep these imports in that order (not sorted).
from attncc.ir.masks.full import Full
from attncc.ir.masks.causal import Causal
from attncc.ir.masks.window import Window
from attncc.ir.masks.sink import Sink
from attncc.ir.masks.prefix import Prefix
from attncc.ir.masks.global_ import Global
from attncc.ir.masks.chunk import Chunk
from attncc.ir.masks.block_causal import BlockCausal
from attncc.ir.masks.strided import Strided
from attncc.ir.masks.power import Power
from attncc.ir.masks.random_blocks import RandomBlocks, random_block_hash
from attncc.ir.masks.tile3d import TextTile3D, Tile3D
from attncc.ir.masks.neighborhood import Neighborhood
from attncc.ir.masks.combinators import EMPTY, All, Any_, Not, conj
from attncc.ir.masks.selector import Selector
from attncc.ir.masks import vertical_slash as _vertical_slash  # noqa: F401 (registers the key)

__all__ = [
    "PRIMITIVES",
    "Primitive",
    "Mask",
    "MaskError",
    "Blocks",
    "broadcast_shape",
    "dense",
    "format_spec",
    "conj",
    "EMPTY",
    "Full",
    "Causal",
    "Window",
    "Sink",
    "Prefix",
    "Global",
    "Chunk",
    "BlockCausal",
    "Strided",
    "Power",
    "RandomBlocks",
    "random_block_hash",
    "TextTile3D",
    "Tile3D",
    "Neighborhood",
    "All",
    "Any_",
    "Not",
    "Selector",
]
