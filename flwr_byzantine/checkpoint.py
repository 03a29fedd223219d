"""Crash-safe checkpoints of a federated training run (write after every round, resume on restart).

Layout of a checkpoint directory (``<output-dir>/checkpoint/`` in the Flower App)::

    checkpoint.json         round, run-config identity, strategy state, history, metrics,
                            name and SHA-256 of the array file below
    state-r000012.npz       model arrays after round 12 (+ any array state of the strategy)

Writes are atomic: the ``.npz`` of round t is written to a temporary file, flushed,
fsync'ed and renamed into place (``os.replace``); only then is ``checkpoint.json``
replaced the same way, and older ``.npz`` files are removed last.  A crash at any
moment therefore leaves either the previous complete checkpoint or the new one,
never a mix: ``checkpoint.json`` always names an ``.npz`` that exists and whose
hash it records.

:class:`Checkpointer` refuses (:class:`CheckpointMismatch`) to resume from a
checkpoint written under a different configuration (``identity``): resuming must
give the same model as an uninterrupted run, which only holds for the same
seed, data, aggregator, step size, ... (see ``docs/deployment.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

#: Format version of ``checkpoint.json`` (2: explicit ``state_dict`` names for aggregator state).
FORMAT_VERSION = 2

JSON_NAME = "checkpoint.json"
_NPZ_RE = re.compile(r"^state-r(\d+)\.npz$")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (corrupt, missing file, wrong version)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint was written by a run with a different configuration."""


def _jsonable(obj: Any) -> Any:
    """``json.dump`` fallback: numpy scalars and arrays to Python values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _normalise(obj: Any) -> Any:
    """JSON round trip of ``obj`` (tuples become lists ...), for comparisons."""
    return json.loads(json.dumps(obj, default=_jsonable, sort_keys=True))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` via ``write(fileobj)`` into a temp file in the same folder, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def result_to_dict(result: Result) -> dict[str, dict[str, dict[str, Any]]]:
    """The metric parts of a Flower ``Result`` as plain JSON data (arrays are stored separately)."""
    def conv(d: Mapping[int, MetricRecord]) -> dict[str, dict[str, Any]]:
        return {str(int(r)): dict(rec) for r, rec in d.items()}

    return {
        "train_metrics_clientapp": conv(result.train_metrics_clientapp),
        "evaluate_metrics_clientapp": conv(result.evaluate_metrics_clientapp),
        "evaluate_metrics_serverapp": conv(result.evaluate_metrics_serverapp),
    }


def result_from_dict(data: Mapping[str, Any], arrays: ArrayRecord) -> Result:
    """Inverse of :func:`result_to_dict`."""
    def conv(d: Mapping[str, Mapping[str, Any]]) -> dict[int, MetricRecord]:
        return {int(r): MetricRecord(dict(rec)) for r, rec in d.items()}

    return Result(
        arrays=arrays,
        train_metrics_clientapp=conv(data.get("train_metrics_clientapp", {})),
        evaluate_metrics_clientapp=conv(data.get("evaluate_metrics_clientapp", {})),
        evaluate_metrics_serverapp=conv(data.get("evaluate_metrics_serverapp", {})),
    )


@dataclass
class TrainingState:
    """Everything needed to continue a run after ``server_round`` completed rounds.

    Attributes
    ----------
    server_round:
        Last completed round (training, federated and central evaluation done).
    arrays:
        The global model after that round.
    strategy:
        JSON-serialisable strategy state (``RobustSGD.state_dict()``).
    strategy_arrays:
        Array-valued strategy state (e.g. an aggregator's momentum), by name.
    result:
        The Flower ``Result`` so far (metrics of rounds ``0..server_round``).
    meta:
        Free-form extra information stored with the checkpoint (e.g. the number of nodes).
    """

    server_round: int
    arrays: ArrayRecord
    strategy: dict[str, Any] = field(default_factory=dict)
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    result: Result = field(default_factory=Result)
    meta: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    """Saves a :class:`TrainingState` after every round and loads it back on restart.

    Parameters
    ----------
    directory:
        Folder holding ``checkpoint.json`` and the ``state-r*.npz`` files (created on save).
    identity:
        JSON-serialisable description of the run (typically the run config without
        ``output-dir`` and ``checkpoint``).  :meth:`load` raises
        :class:`CheckpointMismatch` when the stored identity differs.
    meta:
        Extra information written with every checkpoint (read back as ``state.meta``).
    """

    def __init__(self, directory: str | os.PathLike[str], identity: Mapping[str, Any],
                 meta: Mapping[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.identity = _normalise(dict(identity))
        self.meta: dict[str, Any] = dict(meta or {})
        self._loaded: TrainingState | None = None

    @property
    def json_path(self) -> Path:
        """Path of ``checkpoint.json``."""
        return self.directory / JSON_NAME

    def exists(self) -> bool:
        """Whether a checkpoint has been written in :attr:`directory`."""
        return self.json_path.is_file()

    # ------------------------------------------------------------------ save
    def save(self, state: TrainingState) -> Path:
        """Atomically write ``state`` (see the module docstring); returns the JSON path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        rnd = int(state.server_round)
        model_keys = list(state.arrays.keys())
        named: dict[str, np.ndarray] = {}
        for i, key in enumerate(model_keys):
            named[f"model_{i}"] = np.ascontiguousarray(state.arrays[key].numpy())
        strategy_keys = sorted(state.strategy_arrays)
        for i, key in enumerate(strategy_keys):
            named[f"strategy_{i}"] = np.ascontiguousarray(np.asarray(state.strategy_arrays[key]))
        npz_name = f"state-r{rnd:06d}.npz"
        npz_path = self.directory / npz_name
        _atomic_write(npz_path, lambda fh: np.savez(fh, **named))
        doc = {
            "format": "flwr-byzantine-checkpoint",
            "version": FORMAT_VERSION,
            "server_round": rnd,
            "identity": self.identity,
            "meta": dict(self.meta, **state.meta),
            "arrays_file": npz_name,
            "arrays_sha256": _sha256(npz_path),
            "model_keys": model_keys,
            "strategy_array_keys": strategy_keys,
            "strategy": state.strategy,
            "result": result_to_dict(state.result),
        }
        text = json.dumps(doc, default=_jsonable, allow_nan=True).encode("utf-8")
        _atomic_write(self.json_path, lambda fh: fh.write(text))
        for old in self.directory.iterdir():
            m = _NPZ_RE.match(old.name)
            if m and old.name != npz_name:
                try:
                    old.unlink()
                except OSError:
                    pass
        return self.json_path

    # ------------------------------------------------------------------ load
    def read_document(self) -> dict[str, Any] | None:
        """The raw ``checkpoint.json`` (validated format, fields and identity), or None if there is none."""
        if not self.exists():
            return None
        try:
            doc = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.json_path} is unreadable: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != "flwr-byzantine-checkpoint":
            raise CheckpointError(f"{self.json_path} is not a flwr-byzantine checkpoint")
        if doc.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {self.json_path} has format version {doc.get('version')}, "
                                  f"this code reads version {FORMAT_VERSION}")
        _check_fields(doc, self.json_path)
        stored = doc["identity"]
        if stored != self.identity:
            keys = sorted(set(stored) | set(self.identity))
            diff = [f"{k}: checkpoint={stored.get(k, '<missing>')!r} now={self.identity.get(k, '<missing>')!r}"
                    for k in keys if stored.get(k, "<missing>") != self.identity.get(k, "<missing>")]
            raise CheckpointMismatch(
                f"refusing to resume from {self.json_path}: it was written with a different configuration "
                f"({'; '.join(diff)}). Use the same run config, or another output-dir (or delete "
                f"{self.directory}) to start a new run."
            )
        return doc

    def load(self) -> TrainingState | None:
        """The stored state, or None if no checkpoint exists.

        Raises :class:`CheckpointMismatch` for another run's checkpoint and
        :class:`CheckpointError` for anything malformed: unreadable or truncated files,
        missing or mistyped fields, a ``server_round`` that is not a positive integer,
        an array file outside the checkpoint folder, a hash mismatch, a corrupt
        ``.npz``, or a model with NaN/Inf entries.
        """
        if self._loaded is not None:
            return self._loaded
        doc = self.read_document()
        if doc is None:
            return None
        npz_path = self.directory / doc["arrays_file"]
        if not npz_path.is_file():
            raise CheckpointError(f"checkpoint {self.json_path} names {npz_path.name}, which is missing")
        if _sha256(npz_path) != doc["arrays_sha256"]:
            raise CheckpointError(f"checkpoint arrays {npz_path} do not match the hash in {self.json_path}")
        try:
            with np.load(npz_path, allow_pickle=False) as data:
                model = {key: data[f"model_{i}"] for i, key in enumerate(doc["model_keys"])}
                strategy_arrays = {key: data[f"strategy_{i}"] for i, key in enumerate(doc["strategy_array_keys"])}
        except Exception as exc:  # pylint: disable=broad-except  # BadZipFile, EOFError, KeyError, ValueError ...
            raise CheckpointError(f"checkpoint arrays {npz_path} are unreadable: {type(exc).__name__}: {exc}") from exc
        for key, arr in model.items():
            if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
                raise CheckpointError(f"checkpoint model array {key!r} has dtype {arr.dtype}")
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise CheckpointError(f"checkpoint model array {key!r} contains NaN or Inf: refusing to resume "
                                      f"(every round would be skipped)")
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in model.items()})
        try:
            result = result_from_dict(doc["result"], arrays)
        except Exception as exc:  # pylint: disable=broad-except
            raise CheckpointError(f"checkpoint {self.json_path} has malformed metrics: {type(exc).__name__}: "
                                  f"{exc}") from exc
        state = TrainingState(
            server_round=doc["server_round"],
            arrays=arrays,
            strategy=dict(doc["strategy"]),
            strategy_arrays=strategy_arrays,
            result=result,
            meta=dict(doc["meta"]),
        )
        self._loaded = state
        return state


def _check_fields(doc: Mapping[str, Any], where: Path) -> None:
    """Types of every field of ``checkpoint.json`` (raises :class:`CheckpointError`)."""
    def fail(msg: str) -> None:
        raise CheckpointError(f"checkpoint {where} is malformed: {msg}")

    rnd = doc.get("server_round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        fail(f"'server_round' must be a positive integer, got {rnd!r}")
    name = doc.get("arrays_file")
    match = _NPZ_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None or Path(name).name != name:
        fail(f"'arrays_file' must be a file name like state-r000012.npz inside the checkpoint folder, got {name!r}")
    if int(match.group(1)) != rnd:
        fail(f"'arrays_file' {name!r} does not belong to round {rnd}")
    if not isinstance(doc.get("arrays_sha256"), str):
        fail("'arrays_sha256' must be a string")
    for key in ("model_keys", "strategy_array_keys"):
        val = doc.get(key)
        if not isinstance(val, list) or not all(isinstance(k, str) for k in val) or len(set(val)) != len(val):
            fail(f"'{key}' must be a list of distinct strings")
    if not doc["model_keys"]:
        fail("'model_keys' is empty")
    for key in ("identity", "strategy", "result", "meta"):
        if not isinstance(doc.get(key), dict):
            fail(f"'{key}' must be an object")


__all__ = [
    "CheckpointError", "CheckpointMismatch", "Checkpointer", "FORMAT_VERSION", "TrainingState",
    "result_from_dict", "result_to_dict",
]
