"""GPU benchmark of the cuda backend: images/s and the fraction of the GPU's SGEMM rate.

Run on a machine with an NVIDIA GPU, CuPy and Numba's CUDA target (``pip install -e ".[cuda]"``)::

    python bench/gpu.py                  # both nets, every method
    python bench/gpu.py --nets cifar_vgg --repeats 3

Two nets with random (He-scaled) float32 weights:

- ``cifar_vgg``: 3x32x32, conv3x3/pad1 3-64, 64-64, maxpool2, 64-128, 128-128, maxpool2,
  128-256, 256-256, maxpool2, flatten, fc 4096-512-10, at batch 256;
- ``vgg16``: VGG-16's shape (3x224x224, 13 conv3x3/pad1 layers, 5 max-pools, fc 25088-4096-4096-1000)
  at batch 16.

Methods: ``forward`` (net.forward), ``gradient`` and ``lrp.epsilon_plus_flat`` (through a
prepared :class:`relprop.Explainer`), and ``pattern_stats`` (one pass of the pattern
covariance sums over the batch: a traced forward plus ``pattern_stats_conv2d`` /
``pattern_stats_dense`` for every conv/dense layer into float64 accumulators).

Each method is called once untimed (JIT compilation), then ``--repeats`` times; every
timed call ends with a synchronisation of CuPy's current stream (which the Numba kernels
also run on), and the best time is reported.  The SGEMM reference is ``cupy.matmul`` of two
8192x8192 float32 matrices, measured in the same run.  "GEMM fraction" is the method's
nominal FLOP count divided by its time and by that SGEMM rate, with nominal FLOPs per
image: forward F (2 x the multiply-adds of the conv/dense layers), gradient 2F (forward +
input-VJP), LRP-ε+flat 3F (forward, one modified forward for z+, one transposed pass; the
flat and ε layers need no extra GEMM of their own beyond these), pattern statistics
F + Σ_layers 2·P·(3J+1)(I+1) (the forward plus one (3J+1)x(I+1) GEMM row per output
position P).  A fraction near 1 would mean the method runs at the speed of one big SGEMM.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def vgg_spec(in_ch, size, blocks, fc, classes):
    """A VGG-style spec: ``blocks`` is a list of lists of conv widths, each list ending in a 2x2 max-pool."""
    spec, c = [], in_ch
    for widths in blocks:
        for k in widths:
            spec += [{"type": "conv2d", "in": c, "out": k, "kernel": 3, "padding": 1}, {"type": "relu"}]
            c = k
        spec.append({"type": "maxpool2d", "kernel": 2, "stride": 2})
        size //= 2
    spec.append({"type": "flatten"})
    d = c * size * size
    for width in fc:
        spec += [{"type": "linear", "in": d, "out": width}, {"type": "relu"}]
        d = width
    spec.append({"type": "linear", "in": d, "out": classes})
    return spec


NETS = {
    "cifar_vgg": dict(shape=(3, 32, 32), batch=256,
                      spec=vgg_spec(3, 32, [[64, 64], [128, 128], [256, 256]], [512], 10)),
    "vgg16": dict(shape=(3, 224, 224), batch=16,
                  spec=vgg_spec(3, 224, [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3], [4096, 4096], 1000)),
}


def random_net(spec, seed=0):
    """He-scaled random float32 weights, small biases (activations stay O(1) through the depth)."""
    import relprop

    rng = np.random.default_rng(seed)
    weights = {}
    for i, layer in enumerate(spec):
        if layer["type"] == "conv2d":
            shape = (layer["out"], layer["in"], 3, 3)
        elif layer["type"] == "linear":
            shape = (layer["out"], layer["in"])
        else:
            continue
        fan_in = int(np.prod(shape[1:]))
        weights[f"{i}.weight"] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
        weights[f"{i}.bias"] = rng.standard_normal(shape[0], dtype=np.float32) * np.float32(0.01)
    return relprop.from_spec(spec, weights)


def forward_flops(net, in_shape):
    """2 x multiply-adds of every conv/dense layer, per image."""
    flops, shapes = 0, net.shapes((1,) + tuple(in_shape))
    for layer, out in zip(net.layers, shapes):
        if layer.kind in ("conv2d", "linear"):
            flops += 2 * int(np.prod(out[1:])) * int(np.prod(layer.weight.shape[1:]))
    return flops


def pattern_gemm_flops(net, in_shape):
    """Per image: the (3J+1)x(I+1) GEMM of the pattern sums at every output position of every conv/dense layer."""
    flops, shapes = 0, net.shapes((1,) + tuple(in_shape))
    for layer, out in zip(net.layers, shapes):
        if layer.kind in ("conv2d", "linear"):
            positions = int(np.prod(out[2:])) if layer.kind == "conv2d" else 1
            j, i = layer.weight.shape[0], int(np.prod(layer.weight.shape[1:]))
            flops += 2 * positions * (3 * j + 1) * (i + 1)
    return flops


def pattern_stats_pass(net, x, cp):
    """One pass of the pattern covariance sums over the batch x (float64 accumulators on the device)."""
    from relprop._backend import kernels

    K = kernels("cuda")
    trace = net.trace(x, backend="cuda", check=False)
    for i, layer in enumerate(net.layers):
        if layer.kind not in ("conv2d", "linear"):
            continue
        w, b = layer.params(x)
        b = cp.zeros(w.shape[0], x.dtype) if b is None else b
        j, in_shape = w.shape[0], tuple(w.shape[1:])
        acc = (cp.zeros(()), cp.zeros(in_shape), cp.zeros(j), cp.zeros((2, j)),
               cp.zeros((j,) + in_shape), cp.zeros((2, j) + in_shape))
        a, z = trace.inputs[i], trace.layer_output(i)
        if layer.kind == "conv2d":
            K.pattern_stats_conv2d(a, z, b, layer.stride, layer.padding, layer.dilation, *acc)
        else:
            K.pattern_stats_dense(a, z, b, *acc)


def best_time(fn, sync, repeats):
    fn()
    sync()  # untimed: JIT compilation and cuBLAS handles
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_rate(cp, sync, n=8192, repeats=5):
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.empty((n, n), dtype=cp.float32)
    t = best_time(lambda: cp.matmul(a, b, out=c), sync, repeats)
    return 2.0 * n ** 3 / t


def check_against_cpu(net, shape, cp):
    """A quick correctness check on 2 images: cuda vs cpu forward and gradient."""
    import relprop

    x = np.random.default_rng(1).standard_normal((2,) + shape).astype(np.float32)
    out = {}
    for method in ("forward", "gradient"):
        if method == "forward":
            got, want = net.forward(cp.asarray(x), backend="cuda").get(), net.forward(x, backend="cpu")
        else:
            got = relprop.explain(net, cp.asarray(x), "gradient", backend="cuda").get()
            want = relprop.explain(net, x, "gradient", backend="cpu")
        out[method] = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS), default=list(NETS))
    parser.add_argument("--methods", nargs="+",
                        default=["forward", "gradient", "lrp.epsilon_plus_flat", "pattern_stats"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-check", action="store_true", help="skip the cuda-vs-cpu check on 2 images")
    args = parser.parse_args(argv)

    try:
        import cupy as cp
        from numba import cuda

        if not cuda.is_available() or cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no GPU visible to Numba/CuPy")
    except Exception as exc:
        print(f"bench/gpu.py needs an NVIDIA GPU with CuPy and numba.cuda: {type(exc).__name__}: {exc}")
        return 2
    import relprop

    sync = cp.cuda.get_current_stream().synchronize
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rate = sgemm_rate(cp, sync)
    print(f"device: {name}; cupy {cp.__version__}; numba.cuda {getattr(cuda, 'implementation', '?')}")
    print(f"cuBLAS SGEMM 8192^3 (cupy.matmul): {rate / 1e12:.1f} TFLOP/s")
    print(f"{'net':10s} {'batch':>5s} {'method':24s} {'ms/batch':>9s} {'images/s':>9s} {'TFLOP/s':>8s} "
          f"{'GEMM fraction':>13s}")
    for net_name in args.nets:
        cfg = NETS[net_name]
        net = random_net(cfg["spec"])
        if not args.no_check:
            diff = check_against_cpu(net, cfg["shape"], cp)
            print(f"{net_name}: cuda vs cpu max relative difference on 2 images: {diff}")
        x = cp.asarray(np.random.default_rng(0).standard_normal((cfg["batch"],) + cfg["shape"], dtype=np.float32))
        f = forward_flops(net, cfg["shape"])
        for method in args.methods:
            if method == "forward":
                fn, flops = (lambda: net.forward(x, backend="cuda")), f
            elif method == "pattern_stats":
                fn, flops = (lambda: pattern_stats_pass(net, x, cp)), f + pattern_gemm_flops(net, cfg["shape"])
            else:
                explainer = relprop.Explainer(net, method, backend="cuda")
                fn = (lambda e=explainer: e(x))
                flops = {"gradient": 2 * f, "lrp.epsilon_plus_flat": 3 * f}.get(method, 2 * f)
            t = best_time(fn, sync, args.repeats)
            achieved = flops * cfg["batch"] / t
            print(f"{net_name:10s} {cfg['batch']:5d} {method:24s} {t * 1e3:9.2f} {cfg['batch'] / t:9.1f} "
                  f"{achieved / 1e12:8.2f} {achieved / rate:13.2f}")
            cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
