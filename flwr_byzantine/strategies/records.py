"""Flattening Flower ``ArrayRecord`` models to the vectors the aggregators work on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord


@dataclass(frozen=True)
class ArrayLayout:
    """Ordered keys, shapes and dtypes of a model's ``ArrayRecord`` (x in R^d, flattened)."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, record: ArrayRecord) -> "ArrayLayout":
        """Layout of ``record`` (the global model)."""
        keys, shapes, dtypes = [], [], []
        for key, arr in record.items():
            nd = arr.numpy()
            keys.append(key)
            shapes.append(tuple(int(s) for s in nd.shape))
            dtypes.append(str(nd.dtype))
        return cls(tuple(keys), tuple(shapes), tuple(dtypes))

    @property
    def size(self) -> int:
        """d, the number of scalars in the flattened model."""
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def flatten(self, record: ArrayRecord, dtype: type = np.float64) -> np.ndarray:
        """Concatenate the arrays of ``record`` in layout order (raises ValueError on mismatch)."""
        if tuple(record.keys()) != self.keys and set(record.keys()) != set(self.keys):
            raise ValueError(f"array keys {sorted(record.keys())} != expected {sorted(self.keys)}")
        parts = []
        for key, shape in zip(self.keys, self.shapes):
            nd = record[key].numpy()
            if tuple(nd.shape) != shape:
                raise ValueError(f"array '{key}' has shape {tuple(nd.shape)}, expected {shape}")
            if not np.issubdtype(nd.dtype, np.floating):
                raise ValueError(f"array '{key}' has dtype {nd.dtype}, expected a floating dtype")
            parts.append(nd.astype(dtype, copy=False).ravel())
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def unflatten(self, vec: np.ndarray) -> ArrayRecord:
        """Inverse of :meth:`flatten`, casting back to each array's original dtype."""
        if vec.shape != (self.size,):
            raise ValueError(f"vector has shape {vec.shape}, expected ({self.size},)")
        out, start = {}, 0
        for key, shape, dt in zip(self.keys, self.shapes, self.dtypes):
            n = int(np.prod(shape))
            out[key] = Array(np.ascontiguousarray(vec[start : start + n].reshape(shape).astype(dt)))
            start += n
        return ArrayRecord(out)


def record_nbytes(record: ArrayRecord) -> int:
    """Serialized payload size of an ``ArrayRecord`` in bytes (sum of its arrays' data)."""
    return int(sum(len(arr.data) for arr in record.values()))
