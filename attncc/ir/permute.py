"""Static token permutations: the order a kernel works in, and its inverse."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.ir.masks.base import check_grid_length


@dataclass(frozen=True)
class TilePermutation:
    """Row-major T x H x W tokens regrouped into row-major t x h x w tiles.

    ``index(n)[i]`` is the model position of the token at kernel slot ``i``, so a
    3D-local neighbourhood lands in few kernel blocks.
    """

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def check(self, n: int, what: str = "sequence") -> None:
        check_grid_length("permute", self.grid, n, what)

    def index(self, device=None) -> torch.Tensor:
        """kernel slot -> model position, int64 ``[T*H*W]``."""
        (gt, gh, gw), (tt, th, tw) = self.grid, self.tile
        pos = torch.arange(self.size, device=device).view(gt // tt, tt, gh // th, th, gw // tw, tw)
        return pos.permute(0, 2, 4, 1, 3, 5).reshape(-1).contiguous()

    def inverse(self, device=None) -> torch.Tensor:
        """model position -> kernel slot."""
        idx = self.index(device)
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(idx.numel(), device=idx.device)
        return inv

    def to_spec(self) -> dict:
        return {"grid": list(self.grid), "tile": list(self.tile)}
