"""The worker's host-side block tables: a row per request, grown on demand."""

from __future__ import annotations

import numpy as np

from executor.block_table import BlockTables


def test_rows_hold_each_requests_blocks_and_grow():
    tables = BlockTables(max_blocks_per_seq=6, rows=2)
    rows = [tables.add([10 * i + 1, 10 * i + 2]) for i in range(5)]  # grows twice
    assert len(set(rows)) == 5 and tables.array.shape[0] == 8
    tables.set(rows[3], 2, [33, 34])  # new blocks appended after the two held
    tables.set(rows[1], 0, [7])  # a resumed request's table rewritten from the start
    got = tables.gather([rows[3], rows[0], rows[1]], 4)
    np.testing.assert_array_equal(got, [[31, 32, 33, 34], [1, 2, 0, 0], [7, 12, 0, 0]])
    tables.remove(rows[0])
    assert tables.add([99]) == rows[0]  # a freed row is reused, cleared first
    np.testing.assert_array_equal(tables.gather([rows[0]], 2), [[99, 0]])
