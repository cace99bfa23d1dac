"""relprop.dist on a real LocalCluster (2 worker processes, 1 thread each): the promises of issue 15.

One module-scoped cluster serves every test (starting one takes 7-25 s on the 2-core
machines); the fault test kills a worker and runs last.
"""
import json
import logging
import os
import sys
import threading
import time
import warnings

import numpy as np
import pytest

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
da = pytest.importorskip("dask.array")

import relprop  # noqa: E402
from relprop import dist  # noqa: E402
from relprop.patterns import PatternWarning  # noqa: E402

PATTERN_FIELDS = ("a", "a_plus", "a_minus")


@pytest.fixture(scope="module")
def client():
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # _slow_rows below travels by value
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=logging.ERROR, env={"NUMBA_NUM_THREADS": "1"})
    c = distributed.Client(cluster)
    try:
        here = os.path.dirname(relprop.__file__)
        # the workers import this checkout's relprop (not another installed copy)
        assert set(c.run(lambda: os.path.dirname(__import__("relprop").__file__)).values()) == {here}
        yield c
    finally:
        c.close()
        cluster.close()


@pytest.fixture(scope="module")
def cnn():
    return relprop.zoo.load("digits_cnn")


@pytest.fixture(scope="module")
def digits():
    """256 digits (1x28x28): the zoo's samples and their slightly shifted, noisy copies."""
    m = relprop.zoo.load("digits_cnn")
    rng = np.random.default_rng(15)
    reps = [np.roll(m.x, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(2, 3)) for _ in range(13)]
    x = np.concatenate(reps)[:256]
    return np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


def _fit_quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        return fn(*args, **kw)


def _assert_same_patterns(p, q, rtol=1e-12, min_samples=8):
    """Patterns equal to ``rtol`` of each array's largest entry, and the float64 sums to ``rtol``.

    A regime with a handful of samples is excluded from the pattern comparison: its sums
    come from a subtraction (all minus positive), so a regime of one sample has a
    denominator of pure rounding noise (FINDINGS.md, "PatternNet statistics"), and the
    pattern changes with the order of the additions, in or out of Dask.
    """
    assert list(p) == list(q)
    for i in p:
        st = p.stats[i]
        n, n_pos = float(st.count), np.asarray(st.count_pos)
        enough = {"a": np.full(n_pos.shape, n >= min_samples), "a_plus": n_pos >= min_samples,
                  "a_minus": n - n_pos >= min_samples}
        for name in PATTERN_FIELDS:
            a, b = np.asarray(getattr(p[i], name)), np.asarray(getattr(q[i], name))
            scale = max(float(np.max(np.abs(a))), 1e-300)
            err = np.abs(a - b).reshape(a.shape[0], -1).max(axis=1)[enough[name]]
            assert enough[name].mean() >= 0.5 and np.max(err) <= rtol * scale, (i, name, np.max(err) / scale)
        for acc in ("sum_x", "sum_y", "sum_x_pos", "sum_xy"):
            s, t = np.asarray(getattr(st, acc)), np.asarray(getattr(q.stats[i], acc))
            assert np.max(np.abs(s - t)) <= rtol * np.max(np.abs(s)), (i, acc)


def _assert_same_counts(s, t):
    assert s.n_inputs == t.n_inputs
    for i in s.layers:
        assert float(s[i].count) == float(t[i].count), i
        np.testing.assert_array_equal(np.asarray(s[i].count_pos), np.asarray(t[i].count_pos))


# -- pattern statistics ------------------------------------------------------------------------
def test_fit_patterns_equals_single_process(client, cnn, digits):
    x = digits[:160].astype(np.float64)                # float64 statistics end to end
    want = _fit_quiet(relprop.fit_patterns, cnn.net, x, batch_size=20, progress=False)
    got = _fit_quiet(dist.fit_patterns, cnn.net, da.from_array(x, chunks=(20, 1, 28, 28)), client=client,
                     split_every=3)                    # 8 chunks: a tree of two merge levels
    _assert_same_patterns(want, got)
    _assert_same_counts(want.stats, got.stats)
    assert got.stats.n_inputs == len(x) and got.mean_y == want.mean_y
    # dask's default scheduler (no client), from a NumPy array with another chunking: same patterns
    local = _fit_quiet(dist.fit_patterns, cnn.net, x, chunk=80, batch_size=20)
    _assert_same_patterns(want, local)
    # the lazy building block: the merged sums, without the net (it never travels back)
    s = dist.pattern_stats(cnn.net, x[:40], chunk=20).compute(scheduler="synchronous")
    assert s.n_inputs == 40 and s.net is None


def test_net_travels_once_not_in_every_task(cnn, digits):
    """Without a client the net (or the Explainer) is one key of the graph; the tasks refer to it."""
    import pickle

    import cloudpickle

    net_bytes = len(pickle.dumps(cnn.net))
    lazy = {"net": dist.pattern_stats(cnn.net, digits, chunk=16),
            "explainer": dist.explain(cnn.net, digits, "gradient", chunk=16)}
    for name, obj in lazy.items():
        graph = dict(obj.__dask_graph__())
        shared = [k for k in graph if str(k).startswith(f"relprop-{name}-")]
        assert len(shared) == 1 and len(cloudpickle.dumps(graph[shared[0]])) >= net_bytes
        tasks = [k for k in graph if str(k).startswith(("_chunk_stats", "_explain_block"))]
        assert len(tasks) == 16
        assert max(len(cloudpickle.dumps(graph[k])) for k in tasks) < net_bytes / 50


# -- explanations ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lrp.epsilon_plus_flat", "gradient", "pattern.attribution"])
def test_explain_equals_in_memory_bitwise(client, cnn, digits, method):
    opts = {"patterns": cnn.patterns} if method.startswith("pattern.") else {}
    target = np.arange(len(digits)) % 10
    R = dist.explain(cnn.net, da.from_array(digits, chunks=(64, 1, 28, 28)), method, target=target, client=client,
                     **opts)
    assert isinstance(R, da.Array) and R.shape == digits.shape and R.dtype == digits.dtype
    got = client.compute(R).result()
    # in memory at the same chunk sizes (float32 sums depend on the batch split)
    ex = relprop.Explainer(cnn.net, method, **opts)
    want = np.concatenate([ex(digits[s:s + 64], target[s:s + 64]) for s in range(0, len(digits), 64)])
    np.testing.assert_array_equal(got, want)


def _markers(out):
    d = os.path.join(out, ".relprop", "done")
    return {int(n[:-5]): json.load(open(os.path.join(d, n)))["run"] for n in os.listdir(d) if n.endswith(".json")}


def test_explain_to_zarr_resumes_only_missing_chunks(client, cnn, digits, tmp_path):
    out = str(tmp_path / "R.zarr")
    x = da.from_array(digits[:192], chunks=(32, 1, 28, 28))          # 6 chunks
    R = dist.explain(cnn.net, x, "lrp.epsilon_plus_flat", client=client, out=out)
    want = relprop.explain(cnn.net, digits[:192], "lrp.epsilon_plus_flat")
    first = _markers(out)
    assert sorted(first) == list(range(6)) and len(set(first.values())) == 1
    z = zarr.open_array(out, mode="r")
    assert z.shape == (192, 1, 28, 28) and z.chunks == (32, 1, 28, 28)
    np.testing.assert_array_equal(R.compute(), np.concatenate([relprop.explain(cnn.net, digits[s:s + 32],
                                                                               "lrp.epsilon_plus_flat")
                                                               for s in range(0, 192, 32)]))
    np.testing.assert_allclose(R.compute(), want, rtol=1e-4, atol=1e-6)

    # delete two chunks: one's data (a lost file), one's marker (a chunk cut off mid-write)
    os.remove(os.path.join(out, z.metadata.encode_chunk_key((1, 0, 0, 0))))
    os.remove(os.path.join(out, ".relprop", "done", "4.json"))
    assert dist.completed_chunks(out) == [0, 2, 3, 5]
    with pytest.raises(ValueError, match=r"incomplete: chunk\(s\) \[1, 4\]"):
        dist.open_result(out)                       # nothing half-written passes as complete
    R2 = dist.explain(cnn.net, x, "lrp.epsilon_plus_flat", client=client, out=out)
    second = _markers(out)
    rerun = {k for k in second if second[k] != first.get(k)}
    assert rerun == {1, 4}                            # only the two missing chunks were computed again
    np.testing.assert_array_equal(R2.compute(), R.compute())

    # another job into the same folder is refused unless overwrite=True
    with pytest.raises(ValueError, match="another job"):
        dist.explain(cnn.net, x, "gradient", client=client, out=out)
    with pytest.raises(ValueError, match="not written by relprop.dist"):
        dist.explain(cnn.net, x, "gradient", out=str(tmp_path))


def test_explain_without_client_and_other_output_shapes(cnn, digits, tmp_path):
    """dask's default scheduler; a .npy path in; a method whose map is not shaped like x (erasure)."""
    x = digits[:40].astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    R = dist.explain(cnn.net, str(tmp_path / "x.npy"), "lrp.epsilon", chunk=16, out=str(tmp_path / "R.zarr"))
    # bitwise at equal chunk sizes: even float64 sums differ in the last bit across batch splits
    np.testing.assert_array_equal(R.compute(), np.concatenate([relprop.explain(cnn.net, x[s:s + 16], "lrp.epsilon")
                                                               for s in (0, 16, 32)]))
    E = dist.explain(cnn.net, x[:8], "erasure", chunk=4)
    want = relprop.explain(cnn.net, x[:8], "erasure")
    assert E.shape == want.shape
    np.testing.assert_allclose(E.compute(), want, rtol=1e-12, atol=1e-12)


# -- evaluation ------------------------------------------------------------------------------
def test_perturbation_curve_and_aopc(client, cnn, digits):
    x, n = digits[:96], 96
    R = relprop.explain(cnn.net, x, "lrp.epsilon_plus_flat")
    opts = dict(patch=4, steps=12, fill="mean", batch_size=64)
    curve = dist.perturbation_curve(cnn.net, da.from_array(x, chunks=(48, 1, 28, 28)), R, **opts)
    assert isinstance(curve, da.Array) and curve.shape == (n, 13)
    got = client.compute(curve).result()
    want = np.concatenate([relprop.metrics.perturbation_curve(cnn.net, x[s:s + 48], R[s:s + 48], **opts)
                           for s in (0, 48)])
    np.testing.assert_array_equal(got, want)
    assert dist.aopc(curve, client=client) == pytest.approx(relprop.metrics.aopc(want), rel=1e-12)
    np.testing.assert_allclose(dist.aopc(da.from_array(want, chunks=(10, 13)), per_sample=True),
                               relprop.metrics.aopc(want, per_sample=True), rtol=1e-12)
    # seeded random fills: reproducible per chunk
    a = dist.perturbation_curve(cnn.net, x, R, patch=4, steps=3, seed=1, chunk=48).compute(scheduler="synchronous")
    b = dist.perturbation_curve(cnn.net, x, R, patch=4, steps=3, seed=1, chunk=48).compute(scheduler="synchronous")
    np.testing.assert_array_equal(a, b)


# -- bad input -------------------------------------------------------------------------------
def test_bad_inputs(cnn, digits):
    net = cnn.net
    split = da.from_array(digits, chunks=(64, 1, 14, 28))
    with pytest.raises(ValueError, match="split the feature axes"):
        dist.fit_patterns(net, split)
    with pytest.raises(ValueError, match="split the feature axes"):
        dist.explain(net, split, "gradient")
    assert dist.as_dask_array(split, chunk=64).chunks[1:] == ((1,), (28,), (28,))     # chunk= rechunks
    with pytest.raises(TypeError, match="dtype int64"):
        dist.fit_patterns(net, da.from_array((digits * 255).astype(np.int64), chunks=64))
    with pytest.raises(TypeError, match="dtype float16"):
        dist.explain(net, digits.astype(np.float16), "gradient")
    with pytest.raises(ValueError, match="dimensions|shape"):
        dist.fit_patterns(net, da.zeros((8, 28, 28), chunks=4))
    with pytest.raises(ValueError, match="no inputs"):
        dist.fit_patterns(net, np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="chunk"):
        dist.fit_patterns(net, digits, chunk=0)
    with pytest.raises(ValueError, match="target"):
        dist.explain(net, digits, "gradient", target=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="out of range"):
        dist.explain(net, digits, "gradient", target=99)
    with pytest.raises(TypeError, match="data must be"):
        dist.fit_patterns(net, [[0.0]])
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="could not reach a Dask scheduler"):
        dist.fit_patterns(net, digits, client="tcp://127.0.0.1:9", timeout=2)
    with pytest.raises(ValueError, match="running distributed.Client"):
        dist.explain(net, digits, "gradient", client="tcp://127.0.0.1:9")     # lazy: would outlive the connection
    assert time.perf_counter() - t0 < 20                  # a timeout, not a hang
    # a NaN in a chunk fails on the worker with relprop's message, and the fit raises
    bad = digits.copy()
    bad[100, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dist.fit_patterns(net, bad, chunk=64)


def test_failed_chunk_is_never_presented_as_complete(cnn, digits, tmp_path):
    out = str(tmp_path / "R.zarr")
    bad = digits[:64].copy()
    bad[40, 0, 5, 5] = np.inf                             # chunk 2 of 4 fails on its worker
    with pytest.raises(ValueError, match="NaN or Inf"):
        dist.explain(cnn.net, bad, "gradient", chunk=16, out=out)
    assert 2 not in dist.completed_chunks(out)
    with pytest.raises(ValueError, match="incomplete"):
        dist.open_result(out)


# -- the command line ------------------------------------------------------------------------
def test_cli_fit_patterns_and_explain(client, cnn, digits, tmp_path, capsys):
    from relprop import cli

    npy, zpath = str(tmp_path / "x.npy"), str(tmp_path / "x.zarr")
    np.save(npy, digits[:128].astype(np.float64))   # float32 pattern sums vary with the BLAS thread count
    zarr.create_array(zpath, shape=(128, 1, 28, 28), chunks=(64, 1, 28, 28), dtype=np.float32)[:] = digits[:128]
    address = client.scheduler.address
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        assert cli.main(["fit-patterns", "--model", "digits_cnn", "--data", npy, "--out", str(tmp_path / "p.npz"),
                         "--scheduler", address, "--chunk", "64"]) == 0
    text = capsys.readouterr().out
    assert "connected to" in text and "wrote" in text
    p = relprop.load_patterns(str(tmp_path / "p.npz"), cnn.net)
    want = _fit_quiet(relprop.fit_patterns, cnn.net, digits[:128].astype(np.float64), batch_size=64, progress=False)
    _assert_same_patterns(want, p)
    assert p.stats.n_inputs == 128
    rout = str(tmp_path / "R.zarr")
    assert cli.main(["explain", "--model", "digits_cnn", "--data", zpath, "--out", rout,
                     "--method", "lrp.epsilon_plus_flat", "--scheduler", address]) == 0
    np.testing.assert_array_equal(dist.open_result(rout).compute(),
                                  np.concatenate([relprop.explain(cnn.net, digits[s:s + 64], "lrp.epsilon_plus_flat")
                                                  for s in (0, 64)]))
    with pytest.raises(SystemExit, match="could not reach"):
        cli.main(["fit-patterns", "--model", "digits_cnn", "--data", npy, "--out", str(tmp_path / "q.npz"),
                  "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1"])
    assert not (tmp_path / "q.npz").exists()


# -- fault tolerance (last: it kills a worker) ----------------------------------------------
def _slow_rows(block):
    time.sleep(0.25)          # a slow read: the fit is still running when the worker dies
    return block


def _chunk_results(dask_scheduler):
    """{key: worker addresses} of the finished per-chunk statistics held in memory."""
    return {str(ts.key): [ws.address for ws in ts.who_has] for ts in dask_scheduler.tasks.values()
            if str(ts.key).startswith("_chunk_stats") and ts.state == "memory"}


def test_worker_killed_mid_fit(client, cnn, digits):
    x = digits.astype(np.float64)
    want = _fit_quiet(relprop.fit_patterns, cnn.net, x, batch_size=16, progress=False)
    data = da.from_array(x, chunks=(16, 1, 28, 28)).map_blocks(_slow_rows, dtype=x.dtype)   # 16 chunks
    result, error = {}, {}

    def run():
        try:
            result["p"] = _fit_quiet(dist.fit_patterns, cnn.net, data, client=client, batch_size=16, split_every=8)
        except BaseException as exc:  # noqa: BLE001 - reported below
            error["e"] = exc

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 30
    held = {}
    while time.monotonic() < deadline and len(held) < 3:
        held = client.run_on_scheduler(_chunk_results)
        time.sleep(0.05)
    assert len(held) >= 3, "the chunk statistics did not start"
    victim = next(iter(held.values()))[0]
    lost = [k for k, w in held.items() if w == [victim]]
    try:
        client.run(os._exit, 1, workers=[victim])
    except Exception:  # noqa: BLE001 - CommClosedError: the worker is gone, as intended
        pass
    assert th.is_alive(), "the fit finished before the worker was killed (nothing tested)"
    th.join(60)
    assert not th.is_alive() and not error, error
    got = result["p"]
    assert lost, "the killed worker held no finished chunk (its results were not lost)"
    _assert_same_patterns(want, got)
    _assert_same_counts(want.stats, got.stats)           # nothing lost, nothing counted twice
    assert got.stats.n_inputs == len(x)
