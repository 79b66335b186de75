"""Prompt token ids as the LLM and the server take them: lists and numpy arrays of
integers become a fresh list of Python ints; bools, floats and strings are refused."""

from __future__ import annotations

import numpy as np
import pytest

from engine_core.processor import _token_ids


def test_a_list_of_ints_is_copied():
    ids = [3, 1, 4]
    got = _token_ids(ids)
    assert got == ids and got is not ids


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_numpy_integer_arrays_give_python_ints(dtype):
    got = _token_ids(np.array([7, 8, 9], dtype=dtype))
    assert got == [7, 8, 9] and all(type(t) is int for t in got)


def test_numpy_scalars_in_a_list_give_python_ints():
    got = _token_ids([np.int64(5), 6, np.uint8(7)])
    assert got == [5, 6, 7] and all(type(t) is int for t in got)


@pytest.mark.parametrize(
    "bad",
    [[1, True], [False], [1.0, 2], np.array([True, False]), np.array([1.5]), ["1"],
     np.array([[1, 2]])],
)  # fmt: skip
def test_anything_but_integers_is_refused(bad):
    with pytest.raises(TypeError, match="token ids must be integers"):
        _token_ids(bad)
