"""send_packed: a step's arrays of one dtype in one copy, a view each."""

from __future__ import annotations

import numpy as np
import torch

from executor.upload import ALIGN_BYTES, send_packed


def test_views_hold_each_array_in_its_shape_and_dtype() -> None:
    ids = [5, 6, 7]
    table = np.arange(12, dtype=np.int32).reshape(3, 4)
    pairs = [[0, 1], [2, 0]]
    got = send_packed(torch.device("cpu"), np.int64, ids, table, pairs, [], np.array([9]))
    assert [tuple(v.shape) for v in got] == [(3,), (3, 4), (2, 2), (0,), (1,)]
    assert all(v.dtype == torch.int64 for v in got)
    assert got[0].tolist() == ids
    assert got[1].tolist() == table.tolist()
    assert got[2].tolist() == pairs
    assert got[4].tolist() == [9]


def test_every_view_starts_on_an_aligned_offset() -> None:
    # Triton specializes on 16-byte aligned pointers: a view must start where a tensor
    # of its own would, whatever the sizes before it
    for dtype in (np.int32, np.int64):
        got = send_packed(torch.device("cpu"), dtype, [1], [2, 3, 4], np.zeros((5, 3)), [7])
        base = got[0].data_ptr()
        for view in got:
            assert (view.data_ptr() - base) % ALIGN_BYTES == 0
        assert got[3].tolist() == [7]


def test_views_share_one_buffer() -> None:
    a, b = send_packed(torch.device("cpu"), np.int32, [1, 2], [3])
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a[0] = 10  # one buffer: the model runner writes pending tokens into input_ids in place
    assert a.tolist() == [10, 2] and b.tolist() == [3]
