"""relprop.kernels._pool: recycled buffers for the kernels' large NumPy outputs."""
import gc
import threading

import numpy as np
import pytest

import relprop
import relprop._config as config
from relprop.kernels import _pool

MB = 1 << 20


def _address(a):
    return a.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.setattr(config, "BUFFER_POOL_BYTES", 64 * MB)
    monkeypatch.setattr(config, "BUFFER_POOL_MIN_BYTES", MB)
    _pool.clear()
    yield
    _pool.clear()


def test_large_arrays_are_recycled_and_small_ones_are_not():
    a = _pool.empty((512, 1024), np.float32)  # 2 MB
    assert a.shape == (512, 1024) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert _address(a) % 64 == 0
    where = _address(a)
    del a
    assert _pool.held_bytes() >= 2 * MB
    b = _pool.empty((1024, 256), np.float64)  # the same bytes in another shape and dtype: the same buffer
    assert _address(b) == where and _pool.held_bytes() == 0
    small = _pool.empty((100,), np.float32)
    assert small.base is None  # a plain array
    assert type(_pool.empty_like(b)) is np.ndarray and _pool.empty_like(b).shape == b.shape


def test_a_buffer_is_not_reused_while_any_view_of_it_lives():
    a = _pool.empty((1024, 1024), np.float32)
    where = _address(a)
    view = a[1:, ::2].reshape(-1)[10:]  # views of views: the lease is their base too
    part = a.T
    del a
    view[:] = 7.0
    c = _pool.empty((1024, 1024), np.float32)
    assert _address(c) != where  # still leased by the views
    c[:] = 1.0
    assert (view == 7.0).all()
    del view
    gc.collect()
    d = _pool.empty((1024, 1024), np.float32)
    assert _address(d) != where  # `part` still holds it
    d_where = _address(d)
    del part, d
    gc.collect()
    e, f = _pool.empty((1024, 1024), np.float32), _pool.empty((1024, 1024), np.float32)
    assert {_address(e), _address(f)} == {where, d_where}  # both back, and handed out again


def test_the_pool_holds_at_most_its_budget(monkeypatch):
    monkeypatch.setattr(config, "BUFFER_POOL_BYTES", 5 * MB)
    arrays = [_pool.empty((MB // 4 * 2,), np.float32) for _ in range(4)]  # 2 MB each
    del arrays
    gc.collect()
    assert 4 * MB <= _pool.held_bytes() <= 5 * MB
    monkeypatch.setattr(config, "BUFFER_POOL_BYTES", 0)
    plain = _pool.empty((MB,), np.float32)
    assert plain.base is None
    relprop.release_buffers()
    assert _pool.held_bytes() == 0


def test_threads_get_their_own_buffers():
    errors = []

    def work(k):
        try:
            for _ in range(50):
                a = _pool.empty((300_000,), np.float64)
                a[:] = k
                if not (a == k).all():
                    errors.append(k)
                del a
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("method", ["gradient", "lrp.epsilon_plus_flat", "guided_backprop"])
def test_explanations_are_the_same_with_and_without_the_pool(method, monkeypatch):
    """Recycled buffers hold the previous call's numbers; no kernel may read them: the same bits with
    the pool and without it, on calls that follow calls on other inputs."""
    from nets_factory import make_net

    spec = [{"type": "conv2d", "in": 3, "out": 64, "kernel": 3, "padding": 1}, {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2}, {"type": "conv2d", "in": 64, "out": 64, "kernel": 3, "padding": 1},
            {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "in": 64 * 8 * 8, "out": 5}]
    net = make_net(spec, dtype=np.float32)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((32, 3, 16, 16)).astype(np.float32) for _ in range(3)]
    explainer = relprop.Explainer(net, method)
    with_pool = [explainer(x, 1) for x in xs for _ in range(2)]
    assert _pool.held_bytes() > 0  # the sweeps' outputs did come from the pool
    monkeypatch.setattr(config, "BUFFER_POOL_BYTES", 0)
    without = [explainer(x, 1) for x in xs for _ in range(2)]
    for a, b in zip(with_pool, without):
        assert a.tobytes() == b.tobytes()
