"""Every request's block ids in one int32 array on the host, a row per request.

The model runner used to copy each request's block-id list into a fresh table every
step: at batch 256 that Python loop was a good part of the step's host time. Here a
request's row changes only when blocks are added (about once per block_size decode
steps), and a step's table is one fancy-indexed copy of the rows it needs.
"""

from __future__ import annotations

import numpy as np


class BlockTables:
    def __init__(self, max_blocks_per_seq: int, rows: int = 64) -> None:
        self.array = np.zeros((rows, max_blocks_per_seq), dtype=np.int32)
        self._free = list(range(rows - 1, -1, -1))  # popped from the end: low rows first

    def add(self, block_ids: list[int]) -> int:
        """A row for a new request, holding `block_ids`; returns the row."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.array[row] = 0  # nothing of the row's last request stays (as in a fresh table)
        self.array[row, : len(block_ids)] = block_ids
        return row

    def set(self, row: int, start: int, block_ids: list[int]) -> None:
        """Write `block_ids` into the row from column `start` on."""
        if block_ids:
            self.array[row, start : start + len(block_ids)] = block_ids

    def remove(self, row: int) -> None:
        self._free.append(row)

    def gather(self, rows: list[int], width: int) -> np.ndarray:
        """[len(rows), width] int32: the first `width` block ids of each row, in order."""
        return self.array[rows, :width]

    def _grow(self) -> None:
        old = self.array.shape[0]
        grown = np.zeros((2 * old, self.array.shape[1]), dtype=np.int32)
        grown[:old] = self.array
        self.array = grown
        self._free.extend(range(2 * old - 1, old - 1, -1))
