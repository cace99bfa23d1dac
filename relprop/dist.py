r"""Scale-out on Dask: pattern statistics, explanations and evaluation over chunked data.

Everything here is a thin layer over `Dask <https://docs.dask.org>`_ (``dask.array`` and
``dask.distributed``); relprop writes no scheduler of its own.  The data is a dask array
chunked along the sample axis only (or a zarr array, a zarr path, a ``.npy`` path, a NumPy
array), and every task handles one chunk with the in-memory API:

- :func:`fit_patterns`: each chunk's :class:`relprop.PatternStats` on a worker (the sums
  :math:`n, \sum x, \sum y, \sum x y, \dots` of every dense/conv layer, in float64), a tree of
  :meth:`~relprop.PatternStats.merge` calls (sums of disjoint parts add up to the sums of the
  whole), the patterns built on the client from the merged sums exactly as
  :func:`relprop.fit_patterns` builds them;
- :func:`explain`: the heatmaps as a lazy dask array, or written chunk by chunk to a zarr
  array (``out=``), resumable: a chunk whose completion marker is there is not computed again;
- :func:`perturbation_curve` and :func:`aopc`: :func:`relprop.metrics.perturbation_curve`
  per chunk, AOPC reduced over chunks.

The net (or the prepared :class:`relprop.Explainer`) travels to each worker once: with a
``client`` it is scattered to every worker (``client.scatter(..., broadcast=True)``), without
one it is a single key of the task graph that every task depends on, so no task pickles it.

``client``: a :class:`distributed.Client`; a scheduler address (``"tcp://host:8786"``,
for the calls that compute right away: :func:`fit_patterns`, :func:`explain` with
``out=``, :func:`aopc`; connected for the call and closed after it, a
:class:`ConnectionError` after ``timeout`` seconds if nobody answers); or None: dask's
default scheduler (a ``distributed.Client`` made current by the caller, else dask's
local threads).

Memory: each chunk's statistics are as large as the net's pattern sums (Σxy and Σ₊xy
are twice the size of every weight, in float64), whatever the chunk size, and a merge
task holds ``split_every`` of them: for a big net choose big chunks (fewer partial sums).

Dask and zarr are imported when a function needs them (``pip install relprop[dist]``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import numbers
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["fit_patterns", "pattern_stats", "explain", "perturbation_curve", "aopc", "as_dask_array", "connect",
           "open_result", "completed_chunks", "DEFAULT_CHUNK"]

#: samples per chunk when the data does not bring its own chunking (a NumPy array or a .npy file)
DEFAULT_CHUNK = 256
#: seconds to wait for a scheduler address to answer
DEFAULT_TIMEOUT = 10.0
_log = logging.getLogger("relprop.dist")
_MARKERS = ".relprop"        # inside the zarr array's folder: job.json and done/<chunk>.json


def _dask():
    try:
        import dask
        import dask.array
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("relprop.dist needs dask: pip install 'relprop[dist]' "
                          "(dask[array,distributed] and zarr)") from exc
    return dask


def _zarr():
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover
        raise ImportError("relprop.dist needs zarr for zarr input/output: pip install 'relprop[dist]'") from exc
    return zarr


# -- clients and data --------------------------------------------------------------------------
def connect(address, timeout=DEFAULT_TIMEOUT):
    """A :class:`distributed.Client` for the scheduler at ``address``; ConnectionError after ``timeout`` s.

    ``address`` is what ``dask scheduler`` prints (``tcp://10.0.0.5:8786``) or any deployment
    hands out.  An unreachable address raises instead of waiting forever.
    """
    _dask()
    from distributed import Client

    if not isinstance(address, str) or not address:
        raise TypeError(f"connect: address must be a scheduler address string such as 'tcp://host:8786', "
                        f"got {address!r}")
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"could not reach a Dask scheduler at {address!r} within {timeout} s "
                              f"({type(exc).__name__}: {exc}); start one with `dask scheduler` and "
                              f"workers with `dask worker {address}`, or pass client=None to run locally") from exc


class _ClientFor:
    """``with _ClientFor(client) as c``: a Client, an address (connected, then closed) or None."""

    def __init__(self, client, timeout=DEFAULT_TIMEOUT):
        self.given, self.timeout, self.owned = client, timeout, False

    def __enter__(self):
        c = self.given
        if c is None:
            return None
        if isinstance(c, (str, os.PathLike)):
            self.client = connect(os.fspath(c), self.timeout)
            self.owned = True
            return self.client
        _dask()
        from distributed import Client

        if not isinstance(c, Client):
            raise TypeError(f"client must be a distributed.Client, a scheduler address or None, "
                            f"got {type(c).__name__}")
        return c

    def __exit__(self, *exc):
        if self.owned:
            self.client.close()
        return False


def _npy_rows(path, start, stop):
    return np.array(np.load(path, mmap_mode="r")[start:stop])


def _from_npy(path, chunk):
    """A dask array over a .npy file: each chunk reads its rows (the workers must see ``path``)."""
    dask = _dask()
    da = dask.array
    head = np.load(path, mmap_mode="r")
    shape, dtype = head.shape, head.dtype
    del head
    if len(shape) == 0:
        raise ValueError(f"data: {path} holds a scalar, expected inputs (N, ...)")
    path = os.path.abspath(path)
    parts = [da.from_delayed(dask.delayed(_npy_rows, pure=True)(path, s, min(s + chunk, shape[0])),
                             (min(s + chunk, shape[0]) - s,) + tuple(shape[1:]), dtype=dtype)
             for s in range(0, shape[0], chunk)]
    if not parts:
        return da.zeros((0,) + tuple(shape[1:]), dtype=dtype, chunks=(1,) + tuple(shape[1:]))
    return da.concatenate(parts, axis=0)


def _int_arg(where, name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected an int >= {minimum}")
    return int(value)


def as_dask_array(data, chunk=None, net=None, where="relprop.dist"):
    """``data`` as a dask array chunked along the sample axis only, checked against ``net``.

    ``data``: a dask array, a zarr array, a path to a zarr array or to a ``.npy`` file, or a
    NumPy array.  ``chunk``: samples per chunk (rechunks; default: the data's own chunking,
    :data:`DEFAULT_CHUNK` for NumPy and .npy).  A chunking that splits the feature axes is
    an error unless ``chunk`` is given (which rechunks to whole samples).  The dtype must be
    float32 or float64 (the dtypes a net computes in) and each sample must fit the net.
    """
    dask = _dask()
    da = dask.array
    if chunk is not None:
        chunk = _int_arg(where, "chunk", chunk)
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{where}: data path {path!r} does not exist")
        if path.endswith(".npy"):
            arr = _from_npy(path, chunk or DEFAULT_CHUNK)
        else:
            _zarr()
            arr = da.from_zarr(path)
    elif isinstance(data, da.Array):
        arr = data
    elif type(data).__module__.split(".")[0] == "zarr":
        arr = da.from_zarr(data)
    elif isinstance(data, np.ndarray):
        arr = da.from_array(data, chunks=(chunk or DEFAULT_CHUNK,) + tuple(data.shape[1:]))
    else:
        raise TypeError(f"{where}: data must be a dask array, a zarr array, a path to a zarr array or a .npy "
                        f"file, or a NumPy array; got {type(data).__name__}")
    if arr.ndim < 2:
        raise ValueError(f"{where}: data has shape {tuple(arr.shape)}; expected inputs (N, ...) of the net")
    if np.dtype(arr.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{where}: data has dtype {arr.dtype}; a net computes in float32 or float64 "
                        f"(convert with data.astype(np.float32))")
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: data holds no inputs (shape {tuple(arr.shape)})")
    if net is not None:
        if not (hasattr(net, "shapes") and hasattr(net, "linear_layers")):
            raise TypeError(f"{where}: net must be a relprop net (relprop.from_spec / relprop.load), "
                            f"got {type(net).__name__}")
        # the net's own validation (rank, geometry) on one zero sample: clear messages on the client
        probe = np.zeros((1,) + tuple(arr.shape[1:]), dtype=arr.dtype)
        try:
            if hasattr(net, "check_input"):
                net.check_input(probe, where=f"{where}: data")
            else:
                net.shapes(probe.shape)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(where) else f"{where}: data of shape {tuple(arr.shape)} does not "
                             f"fit the net: {msg}") from None
    if chunk is not None:
        arr = arr.rechunk({0: chunk, **{k: -1 for k in range(1, arr.ndim)}})
    elif any(len(c) > 1 for c in arr.chunks[1:]):
        raise ValueError(f"{where}: data's chunks {tuple(len(c) for c in arr.chunks)} (blocks per axis) split "
                         f"the feature axes; each chunk must hold whole samples: pass chunk=N (samples per "
                         f"chunk) to rechunk, or data.rechunk({{0: N, 1: -1, ...}})")
    return arr


def _shared(obj, client, name):
    """``obj`` once per worker: scattered with a client, else one key of the graph."""
    dask = _dask()
    if client is not None:
        return client.scatter(obj, broadcast=True, hash=False)
    return dask.delayed(obj, name=f"relprop-{name}-{uuid.uuid4().hex}", traverse=False)


def _compute(obj, client, progress):
    """Compute a dask collection on ``client`` (or dask's default scheduler) with an optional progress bar."""
    dask = _dask()
    if client is not None:
        futures = client.compute(obj)
        if progress:
            from distributed import progress as show

            show(futures)
        return client.gather(futures)
    if progress:
        from dask.diagnostics import ProgressBar

        try:
            from distributed import get_client

            get_client()       # a current distributed client: the local ProgressBar does not see it
        except (ImportError, ValueError):
            with ProgressBar():
                return dask.compute(obj)[0]
    return dask.compute(obj)[0]


# -- pattern statistics ----------------------------------------------------------------------
def _chunk_stats(net, block, batch_size, backend):
    """The PatternStats of one chunk (its sums; the net reference is dropped before it travels)."""
    from .patterns import PatternStats

    stats = PatternStats(net)
    for s in range(0, block.shape[0], batch_size):
        stats.update(block[s:s + batch_size], backend)
    stats.net = None
    return stats


def _merge(*parts):
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


def pattern_stats(net, data, client=None, chunk=None, batch_size=256, backend=None, split_every=8):
    """The merged :class:`relprop.PatternStats` of ``data`` as a lazy ``dask.delayed`` object.

    One task per chunk (:meth:`PatternStats.update` over the chunk in batches of
    ``batch_size``), then a tree of merges, ``split_every`` parts per merge.  ``.compute()``
    (or ``client.compute``) gives a PatternStats with ``net=None``: attach the net or pass
    ``net=`` to :meth:`~relprop.PatternStats.patterns`.  :func:`fit_patterns` does all of this.
    """
    dask = _dask()
    where = "relprop.dist.pattern_stats"
    batch_size = _int_arg(where, "batch_size", batch_size)
    split_every = _int_arg(where, "split_every", split_every, 2)
    if isinstance(client, (str, os.PathLike)):
        raise ValueError(f"{where}: the lazy statistics need a running distributed.Client or None, not an address "
                         "(fit_patterns accepts an address)")
    arr = as_dask_array(data, chunk, net, where)
    net_ref = _shared(net, client, "net")
    level = [dask.delayed(_chunk_stats, pure=False)(net_ref, block, batch_size, backend)
             for block in arr.to_delayed().ravel()]
    while len(level) > 1:
        level = [dask.delayed(_merge, pure=False)(*level[i:i + split_every])
                 for i in range(0, len(level), split_every)]
    return level[0]


def _fit_default(name):
    """The default of ``relprop.fit_patterns``'s option ``name`` (so both fits build the same patterns)."""
    from .patterns import fit_patterns as fit

    return inspect.signature(fit).parameters[name].default


def fit_patterns(net, data, client=None, chunk=None, batch_size=256, backend=None, mean_y=None, split_every=8,
                 progress=False, timeout=DEFAULT_TIMEOUT):
    """Fit PatternNet's patterns on Dask: :func:`relprop.fit_patterns` for data that is chunked or remote.

    Parameters
    ----------
    net : relprop net
    data : dask array, zarr array, zarr or .npy path, or NumPy array (N, ...)
        Chunked along the samples only (see :func:`as_dask_array`).
    client : distributed.Client, scheduler address or None
        None: dask's default scheduler (see the module doc).
    chunk : int
        Samples per task (rechunks the data); default: the data's chunking.
    batch_size : int
        Samples per forward pass inside a task.
    backend : None | "reference" | "cpu" | "cuda"
        For the forward passes on the workers.
    mean_y : None | "all" | "regime"
        As in :func:`relprop.fit_patterns` (None: its default).
    split_every : int
        Parts merged per task of the reduction tree.
    progress : bool
        Dask's progress bar (``distributed.progress`` with a client).
    timeout : float
        Seconds to wait for a scheduler address to answer.

    Returns
    -------
    Patterns
        Equal to ``relprop.fit_patterns(net, data)`` up to the rounding of the float64 sums
        (which add up in another order); ``.stats.n_inputs == len(data)``.  A worker lost in
        the middle costs only its tasks, which Dask runs again: every chunk is counted once.
    """
    with _ClientFor(client, timeout) as c:
        lazy = pattern_stats(net, data, client=c, chunk=chunk, batch_size=batch_size, backend=backend,
                             split_every=split_every)
        stats = _compute(lazy, c, progress)
    stats.net = net
    return stats.patterns(mean_y=_fit_default("mean_y") if mean_y is None else mean_y, net=net)


# -- explanations ----------------------------------------------------------------------------
def _targets(target, arr, where):
    """Per-chunk targets: None/int/Unit as they are, an (N,) array split like the data's chunks."""
    dask = _dask()
    da = dask.array
    if target is None or isinstance(target, numbers.Integral) or not hasattr(target, "shape"):
        return [target] * len(arr.chunks[0]), target
    if tuple(target.shape) != (arr.shape[0],):
        raise ValueError(f"{where}: target has shape {tuple(target.shape)}, expected an int, None or an int array "
                         f"of shape ({arr.shape[0]},)")
    if not np.issubdtype(np.dtype(target.dtype), np.integer):
        raise TypeError(f"{where}: target has dtype {target.dtype}, expected integers")
    if isinstance(target, da.Array):
        return list(target.rechunk((arr.chunks[0],)).to_delayed().ravel()), None
    target = np.asarray(target)
    bounds = np.cumsum((0,) + arr.chunks[0])
    return [target[a:b] for a, b in zip(bounds[:-1], bounds[1:])], target[:1]


def _explain_block(explainer, block, target):
    return np.asarray(explainer(block, target))


def _prepare(net, method, backend, options, arr, probe_target, where):
    """The Explainer (checked on the client) and the per-sample output shape and dtype, from one zero sample."""
    from .methods import Explainer

    explainer = Explainer(net, method, backend=backend, **options)
    probe = np.zeros((1,) + tuple(arr.shape[1:]), dtype=arr.dtype)
    try:
        with np.errstate(all="ignore"):
            r = np.asarray(explainer(probe, probe_target))
        shape, dtype = tuple(r.shape[1:]), r.dtype
    except (ValueError, TypeError):
        if probe_target is not None and not isinstance(probe_target, np.ndarray):
            raise          # an invalid target or option: the same error on every chunk
        shape, dtype = tuple(arr.shape[1:]), arr.dtype
    return explainer, shape, dtype


def explain(net, data, method, target=None, client=None, chunk=None, backend=None, out=None, overwrite=False,
            progress=False, timeout=DEFAULT_TIMEOUT, **options):
    """Explain every sample of ``data`` with ``method``, one task per chunk.

    Parameters
    ----------
    net, method, target, backend, **options
        As in :func:`relprop.explain`; ``target`` may be None, an int, a unit, or an (N,)
        int array (NumPy or dask).
    data : dask array, zarr array, zarr or .npy path, or NumPy array (N, ...)
    client : distributed.Client, None, or (with ``out``) a scheduler address
        Where the Explainer is scattered to (and, with ``out``, where the work runs).
    chunk : int
        Samples per task (rechunks); default: the data's chunking.
    out : None or path
        None: return the heatmaps as a lazy dask array (nothing runs until it is computed).
        A path: write them to a zarr array there, chunk by chunk, without collecting them,
        and return :func:`open_result` of it.  Each finished chunk leaves a completion marker
        (``out/.relprop/done/K.json``, written after the chunk's data); rerunning with the same
        arguments computes only the chunks without a marker or without their data, so an
        interrupted run resumes and a half-written chunk is never taken as complete.  An
        ``out`` holding another job's results (method, options, target, net, shape) is an
        error unless ``overwrite=True``.  The path must be visible to the workers.
    overwrite : bool
        Start ``out`` afresh.
    progress : bool
        Dask's progress bar (with ``out``).

    Returns
    -------
    dask array (N, ...)
        The heatmaps equal ``relprop.explain`` on the same chunks bitwise (the sums depend on
        the batch split in the last bits, float64 included: compare at equal chunk sizes).
    """
    dask = _dask()
    da = dask.array
    where = "relprop.dist.explain"
    arr = as_dask_array(data, chunk, net, where)
    if out is not None:
        arr = _regular(arr, out, overwrite)
    targets, probe_target = _targets(target, arr, where)
    explainer, shape, dtype = _prepare(net, method, backend, options, arr, probe_target, where)
    if out is not None:
        with _ClientFor(client, timeout) as c:
            return _explain_to_zarr(explainer, arr, targets, out, c, progress,
                                    _fingerprint(net, explainer.name, options, target, arr, shape, dtype), overwrite)
    if isinstance(client, (str, os.PathLike)):
        raise ValueError(f"{where}: a lazy result (out=None) needs a running distributed.Client or None, not an "
                         "address (the connection would close before the array is computed)")
    with _ClientFor(client, timeout) as c:
        ex_ref = _shared(explainer, c, "explainer")
    parts = [da.from_delayed(dask.delayed(_explain_block, pure=False)(ex_ref, block, t), (n,) + shape, dtype=dtype)
             for block, t, n in zip(arr.to_delayed().ravel(), targets, arr.chunks[0])]
    return da.concatenate(parts, axis=0)


def _regular(arr, out, overwrite):
    """Rechunk to equal chunks along the samples (zarr's grid): the existing output's, else the first chunk's."""
    rows = arr.chunks[0]
    want = rows[0]
    path = Path(out)
    if not overwrite and (path / "zarr.json").exists():
        try:
            want = int(_zarr().open_array(str(path), mode="r").chunks[0])
        except Exception:  # noqa: BLE001 - not a readable zarr array: _open_out says so
            pass
    if all(r == want for r in rows[:-1]) and rows[-1] <= want:
        return arr
    return arr.rechunk({0: want})


def _fingerprint(net, name, options, target, arr, shape, dtype):
    """What identifies an explain job, for the resumability check (JSON-able)."""
    h = hashlib.sha1()
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(value).tobytes())

    def describe(v):
        """A deterministic description: values as they are, arrays (also inside patterns) by hash."""
        if v is None or isinstance(v, (bool, numbers.Number, str)):
            return repr(v)
        if hasattr(v, "shape") and hasattr(v, "dtype") and not hasattr(v, "dask"):
            a = np.ascontiguousarray(np.asarray(v.get() if hasattr(v, "get") else v))
            return f"array{a.shape}{a.dtype}:" + hashlib.sha1(a.tobytes()).hexdigest()
        if hasattr(v, "dask"):
            return f"dask{tuple(v.shape)}:{v.name}"
        if isinstance(v, Mapping):
            return {str(k): describe(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [describe(x) for x in v]
        if dataclasses.is_dataclass(v):
            return {f.name: describe(getattr(v, f.name)) for f in dataclasses.fields(v) if f.name != "stats"}
        return f"{type(v).__name__}:{v!r}"

    def digest(v):
        text = json.dumps(describe(v), sort_keys=True)
        return text if len(text) <= 80 else "sha1:" + hashlib.sha1(text.encode()).hexdigest()

    return {"method": str(name), "options": {k: digest(v) for k, v in sorted(options.items())},
            "target": digest(target), "net": h.hexdigest(), "data_shape": list(arr.shape),
            "dtype": np.dtype(arr.dtype).name, "out_shape": [int(arr.shape[0])] + list(shape),
            "out_dtype": np.dtype(dtype).name,
            "chunk": int(arr.chunks[0][0])}


def _marker_dir(out):
    return Path(out) / _MARKERS / "done"


def _open_out(out, fingerprint, overwrite):
    """Create (or check) the zarr array at ``out`` and its job record; returns the zarr array."""
    zarr = _zarr()
    import shutil

    path = Path(out)
    job = path / _MARKERS / "job.json"
    shape = tuple(fingerprint["out_shape"])
    chunks = (fingerprint["chunk"],) + shape[1:]
    if path.exists() and not overwrite:
        if not job.exists():
            raise ValueError(f"relprop.dist.explain: out={str(out)!r} exists but was not written by "
                             "relprop.dist.explain; choose another path or pass overwrite=True")
        have = json.loads(job.read_text())
        if have != fingerprint:
            diff = sorted(k for k in fingerprint if have.get(k) != fingerprint[k])
            raise ValueError(f"relprop.dist.explain: out={str(out)!r} holds the results of another job "
                             f"(differs in {', '.join(diff)}); choose another path or pass overwrite=True")
        return zarr.open_array(str(path), mode="r+")
    if path.exists():
        shutil.rmtree(path)
    arr = zarr.open_array(str(path), mode="w", shape=shape, chunks=chunks, dtype=fingerprint["out_dtype"],
                          fill_value=0, zarr_format=3)
    job.parent.mkdir(parents=True, exist_ok=True)
    _marker_dir(out).mkdir(parents=True, exist_ok=True)
    tmp = job.with_suffix(".tmp")
    tmp.write_text(json.dumps(fingerprint))
    os.replace(tmp, job)
    return arr


def _chunk_key(zarr_array, k):
    return zarr_array.metadata.encode_chunk_key((k,) + (0,) * (zarr_array.ndim - 1))


def completed_chunks(out):
    """Sorted indices of the chunks of ``out`` (written by :func:`explain`) whose marker and data are both there."""
    zarr = _zarr()
    path = Path(out)
    arr = zarr.open_array(str(path), mode="r")
    done = []
    marker_dir = _marker_dir(out)
    if not marker_dir.exists():
        return done
    for name in os.listdir(marker_dir):
        if not name.endswith(".json"):
            continue
        k = int(name[:-5])
        if (path / _chunk_key(arr, k)).exists():
            done.append(k)
    return sorted(done)


def _write_chunk(explainer, block, target, out, k, row0, run):
    """Explain one chunk and write it to the zarr array at ``out``; the marker goes last."""
    zarr = _zarr()
    marker = _marker_dir(out) / f"{k}.json"
    marker.unlink(missing_ok=True)
    R = np.asarray(explainer(block, target))
    arr = zarr.open_array(str(out), mode="r+", config={"write_empty_chunks": True})
    if tuple(R.shape[1:]) != tuple(arr.shape[1:]):
        raise ValueError(f"relprop.dist.explain: {explainer.name} returned shape {tuple(R.shape)} for chunk {k}, "
                         f"expected (n, {', '.join(map(str, arr.shape[1:]))})")
    arr[row0:row0 + R.shape[0]] = R.astype(arr.dtype, copy=False)
    tmp = marker.with_name(f"{k}.{run}.tmp")
    tmp.write_text(json.dumps({"chunk": k, "rows": [row0, row0 + int(R.shape[0])], "run": run}))
    os.replace(tmp, marker)
    return k


def _explain_to_zarr(explainer, arr, targets, out, client, progress, fingerprint, overwrite):
    dask = _dask()
    zarr_array = _open_out(out, fingerprint, overwrite)
    done = set(completed_chunks(out))
    run = uuid.uuid4().hex
    ex_ref = _shared(explainer, client, "explainer")
    starts = np.cumsum((0,) + arr.chunks[0])[:-1]
    where = os.path.abspath(os.fspath(out))          # the workers may run in another directory
    tasks = [dask.delayed(_write_chunk, pure=False)(ex_ref, block, t, where, k, int(row0), run)
             for k, (block, t, row0) in enumerate(zip(arr.to_delayed().ravel(), targets, starts))
             if k not in done]
    del zarr_array
    _log.info("relprop.dist.explain: %d of %d chunks to compute, %d already written to %s", len(tasks),
              len(arr.chunks[0]), len(done), out)
    if tasks:
        _compute(tasks, client, progress)
    return open_result(out)


def open_result(out):
    """The heatmaps :func:`explain` wrote to ``out``, as a dask array; ValueError while any chunk is missing."""
    dask = _dask()
    zarr = _zarr()
    arr = zarr.open_array(str(out), mode="r")
    n_chunks = -(-arr.shape[0] // arr.chunks[0])
    done = completed_chunks(out)
    if len(done) != n_chunks:
        missing = sorted(set(range(n_chunks)) - set(done))
        raise ValueError(f"relprop.dist: {str(out)!r} is incomplete: chunk(s) {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} of {n_chunks} not written; rerun "
                         "relprop.dist.explain with the same arguments to finish it")
    return dask.array.from_zarr(arr)


# -- evaluation ------------------------------------------------------------------------------
def _curve_block(net, x, R, target, options, seed):
    from .metrics import perturbation_curve as curve

    return np.asarray(curve(net, x, R, target=target, seed=seed, **options))


def _chunk_seed(seed, k):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError("relprop.dist.perturbation_curve: seed must be None or an int (chunk k draws from "
                        f"numpy.random.default_rng([seed, k])), got {type(seed).__name__}")
    return np.random.default_rng([int(seed), k])


def perturbation_curve(net, data, R, target=None, patch=1, steps=None, fill="random", order="most_relevant",
                       seed=None, batch_size=None, backend=None, client=None, chunk=None):
    """:func:`relprop.metrics.perturbation_curve` per chunk: a lazy dask array (N, steps + 1).

    ``R`` (a dask or NumPy array shaped as that function accepts) is rechunked like the data.
    With ``fill="random"`` or ``order="random"``, chunk k draws from
    ``numpy.random.default_rng([seed, k])``, so the curves depend on the chunking (not on
    the workers); the deterministic fills ("mean", a number) with a relevance order equal
    the in-memory curves at equal chunk sizes.
    """
    dask = _dask()
    da = dask.array
    where = "relprop.dist.perturbation_curve"
    arr = as_dask_array(data, chunk, net, where)
    if not hasattr(R, "shape") or R.ndim < 2 or R.shape[0] != arr.shape[0]:
        raise ValueError(f"{where}: R must be an array with data's {arr.shape[0]} samples, got "
                         f"{getattr(R, 'shape', type(R).__name__)}")
    R = R if isinstance(R, da.Array) else da.from_array(np.asarray(R), chunks=(arr.chunks[0],) + tuple(R.shape[1:]))
    R = R.rechunk({0: arr.chunks[0], **{k: -1 for k in range(1, R.ndim)}})
    patch = _int_arg(where, "patch", patch)
    size = tuple(arr.shape[2:]) if arr.ndim == 4 else (1, int(arr.shape[1]))
    ph = 1 if arr.ndim == 2 else patch
    n_tiles = -(-size[0] // ph) * -(-size[1] // patch)
    steps = n_tiles if steps is None else _int_arg(where, "steps", steps)
    targets, _ = _targets(target, arr, where)
    options = dict(patch=patch, steps=steps, fill=fill, order=order, batch_size=batch_size, backend=backend)
    seeds = [_chunk_seed(seed, k) for k in range(len(arr.chunks[0]))]
    if isinstance(client, (str, os.PathLike)):
        raise ValueError(f"{where}: the lazy curves need a running distributed.Client or None, not an address")
    with _ClientFor(client) as c:
        net_ref = _shared(net, c, "net")
    parts = [da.from_delayed(dask.delayed(_curve_block, pure=False)(net_ref, xb, rb, t, options, s), (n, steps + 1),
                             dtype=arr.dtype)
             for xb, rb, t, s, n in zip(arr.to_delayed().ravel(), R.to_delayed().ravel(), targets, seeds,
                                        arr.chunks[0])]
    return da.concatenate(parts, axis=0)


def aopc(curve, per_sample=False, client=None, compute=True):
    r"""Area over the perturbation curve of a dask array: :func:`relprop.metrics.aopc` over chunks.

    :math:`\frac{1}{L+1} \sum_{k=0}^{L} f_c(x^{(0)}) - f_c(x^{(k)})` per sample (float64; Samek et al.
    2017, the k = 0 term included), averaged over samples unless ``per_sample``.  ``compute=False``
    returns the lazy dask array.
    """
    da = _dask().array
    if not isinstance(curve, da.Array):
        curve = da.asarray(np.asarray(curve))
    if curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(f"aopc: curve must be (N, L + 1) with L >= 1, got shape {tuple(curve.shape)}")
    c = curve.astype(np.float64)
    per = (c[:, :1] - c).mean(axis=1)
    result = per if per_sample else per.mean()
    if not compute:
        return result
    with _ClientFor(client) as cl:
        value = _compute(result, cl, False)
    return np.asarray(value) if per_sample else float(value)
