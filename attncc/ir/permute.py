"""Static token permutations: the order a kernel works in, and its inverse."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attncc.ir.masks.base import MaskError, check_grid_length


@dataclass(frozen=True)
class TilePermutation:
    """Row-major T x H x W tokens regrouped into row-major t x h x w tiles.

    ``index(n)[i]`` is the model position of the token at kernel slot ``i``, so a
    3D-local neighbourhood lands in few kernel blocks. With ``text`` tokens (a joint text + video
    sequence, ``text_at`` its start or its end) only the video tokens are regrouped; the text
    tokens keep their slots.
    """

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    text: int = 0
    text_at: str = "start"

    def __post_init__(self):
        if self.text < 0 or self.text_at not in ("start", "end"):
            raise ValueError(f"permutation text tokens {self.text} at {self.text_at!r}: tokens >= 0, at start|end")

    @property
    def video(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def size(self) -> int:
        return self.video + self.text

    def check(self, n: int, what: str = "sequence") -> None:
        if not self.text:
            check_grid_length("permute", self.grid, n, what)
        elif n != self.size:
            raise MaskError(
                f"permute grid {list(self.grid)} with {self.text} text tokens holds {self.size} tokens "
                f"but the {what} length is {n}"
            )

    def index(self, device=None) -> torch.Tensor:
        """kernel slot -> model position, int64 ``[text + T*H*W]``."""
        (gt, gh, gw), (tt, th, tw) = self.grid, self.tile
        pos = torch.arange(self.video, device=device).view(gt // tt, tt, gh // th, th, gw // tw, tw)
        tiled = pos.permute(0, 2, 4, 1, 3, 5).reshape(-1)
        if not self.text:
            return tiled.contiguous()
        text = torch.arange(self.text, device=device)
        if self.text_at == "start":
            return torch.cat([text, tiled + self.text])
        return torch.cat([tiled, text + self.video])

    def inverse(self, device=None) -> torch.Tensor:
        """model position -> kernel slot."""
        idx = self.index(device)
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(idx.numel(), device=idx.device)
        return inv

    def to_spec(self) -> dict:
        d: dict = {"grid": list(self.grid), "tile": list(self.tile)}
        if self.text:
            d["text"] = {"tokens": self.text, "at": self.text_at}
        return d
