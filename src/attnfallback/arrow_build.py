"""Arrow arrays built from numpy buffers.

`pyarrow.array` asks pandas whether its argument is a pandas object, and so imports pandas (0.3 s
with bytecode, over a second without, in every shard's process: bench/NOTES.md, session 12) on its
first call, even for a numpy array or an empty list. These build the same arrays from buffers
(`pyarrow.Array.from_buffers`), with no pandas, and no copy for contiguous numeric data. A type they
do not build goes to `pyarrow.array` as before.
"""

from __future__ import annotations

import numpy as np

_NUMPY_OF = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8,
             "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "halffloat": np.float16,
             "float": np.float32, "double": np.float64}


def numeric(values, type):
    """A fixed-width numeric or boolean array of `type` from `values` (array-like, no nulls)."""
    import pyarrow as pa

    if pa.types.is_boolean(type):
        flags = np.asarray(values, dtype=bool).reshape(-1)
        bits = np.packbits(flags, bitorder="little")
        return pa.Array.from_buffers(type, len(flags), [None, pa.py_buffer(bits)])
    dtype = _NUMPY_OF.get(str(type))
    if dtype is None:
        return pa.array(values, type=type)
    data = np.ascontiguousarray(np.asarray(values).reshape(-1), dtype=dtype)
    return pa.Array.from_buffers(type, len(data), [None, pa.py_buffer(data)])


def strings(values, type=None):
    """A string array from Python strings (no nulls)."""
    import pyarrow as pa

    type = pa.string() if type is None else type
    encoded = [str(v).encode("utf-8") for v in values]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    large = pa.types.is_large_string(type)
    if not large and offsets[-1] > np.iinfo(np.int32).max:
        return pa.array(list(values), type=type)
    offsets = offsets if large else offsets.astype(np.int32)
    return pa.Array.from_buffers(type, len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def float_lists(matrix: np.ndarray):
    """A list<float32> array, one list per row of a 2-d matrix."""
    import pyarrow as pa

    rows, width = matrix.shape
    offsets = np.arange(0, rows * width + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(numeric(offsets, pa.int32()), numeric(matrix, pa.float32()))


def of_type(values, type):
    """An array of `type` from `values`, built from buffers where this module knows how."""
    import pyarrow as pa

    if pa.types.is_string(type) or pa.types.is_large_string(type):
        if all(isinstance(v, str) for v in values):
            return strings(values, type)
        return pa.array(list(values), type=type)
    if pa.types.is_integer(type) or pa.types.is_floating(type) or pa.types.is_boolean(type):
        if isinstance(values, np.ndarray) or all(v is not None for v in values):
            return numeric(values, type)
    return pa.array(values, type=type)


def empty(type):
    """A zero-length array of `type`."""
    import pyarrow as pa

    return pa.nulls(0, type)
