"""GPU benchmark of the cuda backend, side by side with PyTorch and Zennit on the same GPU.

Run on a machine with an NVIDIA GPU, CuPy and numba-cuda (``pip install -e ".[cuda13]"`` or
``".[cuda12]"``; bench/gpu_check.sh runs it with the rest of the GPU checks)::

    python bench/gpu.py --json gpu_out/gpu.json          # VGG-16 at batch 32, every kernel family
    python bench/gpu.py --quick                           # tiny shapes: a smoke test of this script
    NUMBA_ENABLE_CUDASIM=1 python bench/gpu.py --quick    # no GPU: the Python side in Numba's simulator

One run measures, each as the best of ``--repeats`` timed calls after an untimed one (JIT
compilation, cuBLAS handles, caches), every call ended by a device-wide synchronisation
(so relprop's Numba kernels, CuPy's cuBLAS calls and PyTorch's stream are all included):

1. Ceilings of this GPU in this run: cuBLAS SGEMM (``cupy.matmul``, 8192³ float32, plain
   FP32) and a device-to-device copy (cudaMemcpy of 1 GiB; bandwidth counts the bytes read
   and written).
2. Every kernel family on a VGG-16-sized layer at batch 32 (conv 256→256 3x3 at 56x56,
   fc 25088→4096, pools and ReLUs at 64x224x224): the achieved FLOP rate as a fraction of
   the SGEMM rate (GEMM-shaped kernels: conv2d, dense, weight VJPs, pattern sums) or the
   achieved bandwidth as a fraction of the copy's (im2col, col2im, pooling, elementwise).
3. VGG-16 (3x224x224, random He-scaled float32 weights) at batch 32: relprop's forward,
   gradient, lrp.epsilon_plus_flat and pattern-statistics pass against PyTorch's CUDA
   forward and autograd gradient (TF32 off on both sides unless ``--tf32``; cuDNN's
   autotuner on) and Zennit's
   EpsilonPlusFlat on CUDA (when zennit imports; without torchvision a stand-in module is
   registered for ``zennit.torchvision``, as in tests/test_peers.py).  Relevance starts from
   R_c = f_c(x) for the argmax class on both sides; agreement is reported per sample
   (float32 rounding flips a rare ReLU gate or max-pool switch).  ``peer_over_relprop`` is
   the peer's time over relprop's: above 1, relprop is faster.
4. ResNet-18 at batch 64 through ``relprop.from_torch`` (torchvision's model, random
   weights) when relprop has it (the model-import issue); skipped otherwise.
5. A cuda-vs-cpu cross-check of forward and gradient on 2 images (``--no-check`` skips it;
   it is skipped as well when ``--budget-s`` runs short).

Nominal FLOPs per image (for the "GEMM fraction" of a method): forward F (2 x the
multiply-adds of the conv/dense layers), gradient 2F, LRP-ε+flat 3F, pattern statistics
F + Σ_layers 2·P·(3J+1)(I+1) (the forward plus the (3J+1)x(I+1) GEMM row per output
position P).  Aims (issue 16): lrp.epsilon_plus_flat ≥ 2x Zennit-on-CUDA, conv kernels ≥ 0.6
of SGEMM, pattern statistics ≥ 3,000 VGG-16 images/s.

The JSON (``--json``) is rewritten after every stage, so a run stopped by a time limit
keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's relprop, also without an install
from bench.nets import torch_model  # noqa: E402  (shared with the CPU peers benchmark)
try:  # small test grids make Numba warn about GPU under-utilisation on every launch: noise here
    from numba.core.errors import NumbaPerformanceWarning

    warnings.filterwarnings("ignore", category=NumbaPerformanceWarning)
except ImportError:
    pass


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
    "vgg16": dict(shape=(3, 224, 224), batch=32,
                  spec=vgg_spec(3, 224, [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3], [4096, 4096], 1000)),
    "cifar_vgg": dict(shape=(3, 32, 32), batch=256,
                      spec=vgg_spec(3, 32, [[64, 64], [128, 128], [256, 256]], [512], 10)),
    # --quick: the same code paths on a net small enough for the simulator
    "tiny_vgg": dict(shape=(3, 16, 16), batch=2, spec=vgg_spec(3, 16, [[4], [8, 8]], [16], 10)),
}
METHODS = ["forward", "gradient", "lrp.epsilon_plus_flat", "pattern_stats"]
AIMS = {"lrp_over_zennit": 2.0, "conv_fraction_of_sgemm": 0.6, "pattern_stats_images_per_s": 3000.0}


# ---------------------------------------------------------------------------------------------- device

class Device:
    """The array namespace and a timer: CuPy on a GPU, NumPy under the simulator (times then mean nothing)."""

    def __init__(self):
        from relprop import _backend

        self.sim = _backend.simulator_enabled()
        if self.sim:
            self.xp = np
            return
        import cupy
        from numba import cuda

        if not cuda.is_available() or cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no GPU visible to Numba/CuPy")
        self.xp = cupy

    def sync(self):
        if not self.sim:
            self.xp.cuda.Device().synchronize()  # every stream: relprop's, CuPy's and PyTorch's

    def best(self, fn, repeats):
        """Seconds of the fastest of ``repeats`` calls after one untimed call; each call ends synchronised."""
        fn()
        self.sync()
        fastest = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            self.sync()
            fastest = min(fastest, time.perf_counter() - t0)
        return fastest

    def free(self):
        if not self.sim:
            self.xp.get_default_memory_pool().free_all_blocks()


def environment(dev):
    """Versions and the device, as printed and stored in the JSON."""
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    import numba

    env = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
           "numba_cuda": version("numba-cuda"), "simulator": dev.sim,
           "cupy": next((v for v in (version("cupy-cuda13x"), version("cupy-cuda12x"), version("cupy")) if v), None),
           "torch": version("torch"), "zennit": version("zennit"), "CUDA_HOME": os.environ.get("CUDA_HOME")}
    if not dev.sim:
        cp = dev.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        env.update(device=name, compute_capability=cp.cuda.Device().compute_capability,
                   multiprocessors=props.get("multiProcessorCount"),
                   memory_gib=round(props.get("totalGlobalMem", 0) / 2 ** 30, 1),
                   driver=cp.cuda.runtime.driverGetVersion(), cuda_runtime=cp.cuda.runtime.runtimeGetVersion())
    return env


# ---------------------------------------------------------------------------------------------- ceilings

def ceilings(dev, quick, repeats):
    """cuBLAS SGEMM rate (FLOP/s) and device-to-device copy bandwidth (bytes read + written per s)."""
    xp = dev.xp
    n = 256 if quick else 8192
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = xp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    c = xp.empty((n, n), dtype=np.float32)
    t_gemm = dev.best(lambda: xp.matmul(a, b, out=c), repeats)
    del a, b, c
    size = (1 << 20) if quick else (1 << 30)
    src = xp.ones(size // 4, dtype=np.float32)
    dst = xp.empty_like(src)
    if dev.sim:
        copy = lambda: np.copyto(dst, src)  # noqa: E731
    else:
        copy = lambda: dst.data.copy_from_device_async(src.data, src.nbytes)  # noqa: E731
    t_copy = dev.best(copy, repeats)
    del src, dst
    dev.free()
    return {"sgemm_n": n, "sgemm_flops": 2.0 * n ** 3 / t_gemm, "copy_bytes": 2 * size,
            "copy_bytes_per_s": 2.0 * size / t_copy}


# ---------------------------------------------------------------------------------------------- kernel families

def _family_cases(dev, quick):
    """(family, kernel, call, FLOPs or None, bytes moved or None, shape note) on VGG-16-sized layers at batch 32."""
    import relprop.kernels as K
    from relprop.kernels.cuda import _launch
    from relprop.kernels.cuda import conv2d as cuda_conv

    xp = dev.xp
    rng = np.random.default_rng(0)
    f32 = np.float32
    if quick:
        n, c, hw, big_c, big_hw, fc_in, fc_out = 2, 4, 8, 2, 8, 32, 16
    else:
        n, c, hw, big_c, big_hw, fc_in, fc_out = 32, 256, 56, 64, 224, 25088, 4096
    arr = lambda *s: xp.asarray(rng.standard_normal(s, dtype=f32))  # noqa: E731
    kw = dict(backend="cuda", check_finite=False)
    cases = []

    # conv2d: 3x3 pad 1, C -> C at hw x hw
    x, w, b = arr(n, c, hw, hw), arr(c, c, 3, 3) * f32(0.05), arr(c)
    g = arr(n, c, hw, hw)
    conv_flops = 2.0 * n * c * c * 9 * hw * hw
    shape = f"x ({n},{c},{hw},{hw}), w ({c},{c},3,3), pad 1"
    cases.append(("conv2d", "conv2d_forward", lambda: K.conv2d_forward(x, w, b, 1, 1, **kw), conv_flops, None, shape))
    cases.append(("conv2d", "conv2d_vjp", lambda: K.conv2d_vjp(g, w, x.shape, 1, 1, **kw), conv_flops, None, shape))
    # im2col and col2im alone: bandwidth (each column entry written / read once, the image read / written once)
    rows, q = c * 9, hw * hw
    chunk = cuda_conv.chunk_samples(n, rows + 1, q, 4)
    cols = xp.empty((chunk, rows + 1, q), f32)
    out = xp.empty((n, c, hw, hw), f32)
    zero = f32(0)
    im2col_bytes = 4.0 * (cols.size + chunk * c * hw * hw)
    cases.append(("conv2d", "im2col (kernel alone)", lambda: _launch.launch_grid(
        cuda_conv.im2col_kernel, cols.shape, x, 0, 3, 3, 1, 1, 1, 1, 1, 1, hw, False, cols),
        None, im2col_bytes, f"{chunk} samples of {shape}"))
    cols_v = cols[:, :rows]
    cols_v = xp.ascontiguousarray(cols_v)
    col2im_bytes = 4.0 * (cols_v.size + chunk * c * hw * hw)
    cases.append(("conv2d", "col2im (kernel alone)", lambda: _launch.launch_grid(
        cuda_conv._col2im_kernel, (chunk, c, hw * hw), cols_v, 0, 3, 3, 1, 1, 1, 1, 1, 1, hw, hw, zero, out),
        None, col2im_bytes, f"{chunk} samples of {shape}"))
    cases.append(("train", "conv2d_weight_vjp", lambda: K.conv2d_weight_vjp(x, g, 3, 1, 1, **kw), conv_flops, None,
                  shape))
    z = K.conv2d_forward(x, w, b, 1, 1, **kw)
    j, i_in = c, c * 9
    pattern_flops = 2.0 * n * hw * hw * (3 * j + 1) * (i_in + 1)
    cases.append(("patterns", "pattern_stats_conv2d", lambda: K.pattern_stats_conv2d(x, z, 3, b, 1, 1, **kw),
                  pattern_flops, None, shape))

    # dense: fc 25088 -> 4096 at batch n (a skinny GEMM: bound by reading W)
    xd, wd, bd = arr(n, fc_in), arr(fc_out, fc_in) * f32(0.01), arr(fc_out)
    gd = arr(n, fc_out)
    dense_flops = 2.0 * n * fc_in * fc_out
    dense_bytes = 4.0 * (wd.size + xd.size + n * fc_out)
    shape = f"x ({n},{fc_in}), w ({fc_out},{fc_in})"
    cases.append(("dense", "dense_forward", lambda: K.dense_forward(xd, wd, bd, **kw), dense_flops, dense_bytes, shape))
    cases.append(("dense", "dense_vjp", lambda: K.dense_vjp(gd, wd, **kw), dense_flops, dense_bytes, shape))
    cases.append(("train", "dense_weight_vjp", lambda: K.dense_weight_vjp(xd, gd, **kw), dense_flops, dense_bytes,
                  shape))

    # pooling and elementwise at 64 x 224 x 224
    xb = arr(n, big_c, big_hw, big_hw)
    nb = 4.0 * xb.size
    shape = f"x ({n},{big_c},{big_hw},{big_hw})"
    pooled, switches = K.maxpool2d_forward(xb, 2, 2, **kw)
    gp = arr(*pooled.shape)
    # read x, write out (float32) and switches (int64)
    cases.append(("pool2d", "maxpool2d_forward 2x2/2", lambda: K.maxpool2d_forward(xb, 2, 2, **kw), None,
                  nb + nb / 4 + 2 * nb / 4, shape))
    # read g and switches, write the claim arrays (2 x int32 of x's size) and out
    cases.append(("pool2d", "maxunpool2d", lambda: K.maxunpool2d(gp, switches, xb.shape, **kw), None,
                  nb / 4 + 2 * nb / 4 + 2 * nb + nb, shape))
    cases.append(("pool2d", "avgpool2d_forward 2x2/2", lambda: K.avgpool2d_forward(xb, 2, 2, **kw), None,
                  nb + nb / 4, shape))
    cases.append(("pool2d", "avgpool2d_vjp 2x2/2", lambda: K.avgpool2d_vjp(gp, xb.shape, 2, 2, **kw), None,
                  nb / 4 + nb, shape))
    zb = arr(n, big_c, big_hw, big_hw)
    cases.append(("elementwise", "relu_forward", lambda: K.relu_forward(xb, **kw), None, 2 * nb, shape))
    cases.append(("elementwise", "relu_backward_gradient", lambda: K.relu_backward_gradient(xb, zb, **kw), None,
                  3 * nb, shape))
    cases.append(("elementwise", "stabilized_divide", lambda: K.stabilized_divide(xb, zb, 1e-6, **kw), None,
                  3 * nb, shape))
    return cases


def kernel_families(dev, quick, repeats, ceil, report):
    rows = []
    for family, name, fn, flops, nbytes, shape in _family_cases(dev, quick):
        try:
            t = dev.best(fn, repeats)
        except Exception as exc:  # one failing kernel must not hide the others
            report.error(f"kernel {name}", exc)
            continue
        row = {"family": family, "kernel": name, "shape": shape, "ms": t * 1e3}
        if flops is not None:
            row.update(tflops=flops / t / 1e12, fraction_of_sgemm=flops / t / ceil["sgemm_flops"])
        if nbytes is not None:
            row.update(gb_per_s=nbytes / t / 1e9, fraction_of_copy=nbytes / t / ceil["copy_bytes_per_s"])
        rows.append(row)
        report.line(f"  {family:11s} {name:26s} {t * 1e3:9.3f} ms  "
                    + (f"{row['tflops']:7.2f} TFLOP/s = {row['fraction_of_sgemm']:5.2f} SGEMM  " if flops else "")
                    + (f"{row['gb_per_s']:8.1f} GB/s = {row['fraction_of_copy']:5.2f} copy" if nbytes else ""))
    dev.free()
    return rows


# ---------------------------------------------------------------------------------------------- nets

def random_net(spec, seed=0):
    """relprop net and its weights: He-scaled random float32 weights, small biases."""
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
        weights[f"{i}.weight"] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        weights[f"{i}.bias"] = rng.standard_normal(shape[0], dtype=np.float32) * np.float32(0.01)
    return relprop.from_spec(spec, weights), weights


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


def _per_sample_rel_err(ours, theirs):
    """max |ours − theirs| / max |theirs| per sample (NumPy arrays)."""
    n = len(theirs)
    diff = np.abs(ours - theirs).reshape(n, -1).max(axis=1)
    return diff / np.maximum(np.abs(theirs).reshape(n, -1).max(axis=1), 1e-30)


def _agreement(ours, theirs, tol):
    err = _per_sample_rel_err(np.asarray(ours, np.float64), np.asarray(theirs, np.float64))
    return {"max_rel_err": float(err.max()), "median_rel_err": float(np.median(err)),
            "samples_within_tol": float(np.mean(err < tol)), "tol": tol}


#: float32 per-sample agreement with the peer (see bench/test_bench_peers.py TOLERANCE)
PEER_TOL = {"forward": 1e-5, "gradient": 1e-4, "lrp.epsilon_plus_flat": 1e-4}


class Peers:
    """PyTorch (forward, autograd gradient) and Zennit (EpsilonPlusFlat) on the model, for one batch."""

    def __init__(self, model, x_host, target, device, tf32, canonizers=()):
        import torch

        self.torch = torch
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
        torch.backends.cudnn.benchmark = True  # PyTorch at its best: cuDNN picks its fastest algorithm (untimed call)
        self.model = model
        self.xt = torch.from_numpy(np.ascontiguousarray(x_host)).to(device)
        n_classes = None
        with torch.no_grad():
            n_classes = model(self.xt[:1]).shape[1]
        self.onehot = torch.nn.functional.one_hot(torch.as_tensor(target, device=device), n_classes).float()
        self.xg = self.xt.clone().requires_grad_(True)
        self.canonizers = list(canonizers)
        self._zennit = None

    def forward(self):
        with self.torch.no_grad():
            return self.model(self.xt)

    def gradient(self):
        out = self.model(self.xg)
        return self.torch.autograd.grad(out, self.xg, self.onehot)[0]

    def zennit_epsilon_plus_flat(self):
        if self._zennit is None:
            from tests.torch_models import import_zennit  # needs torch: imported here

            import_zennit()
            from zennit.attribution import Gradient
            from zennit.composites import EpsilonPlusFlat

            self._zennit = Gradient(self.model, EpsilonPlusFlat(canonizers=self.canonizers))
            self._zennit.__enter__()
        onehot = self.onehot
        return self._zennit(self.xg, lambda out: onehot * out.detach())[1]

    def close(self):
        if self._zennit is not None:
            self._zennit.__exit__(None, None, None)
            self._zennit = None


def bench_net(dev, name, net, shape, batch, methods, repeats, report, model=None, canonizers=(), tf32=False,
              spec_flops=True):
    """relprop's methods on ``net`` at ``batch``, side by side with torch/Zennit on ``model`` when given."""
    import relprop

    xp = dev.xp
    x_host = np.random.default_rng(0).standard_normal((batch,) + tuple(shape), dtype=np.float32)
    x = xp.asarray(x_host)
    result = {"batch": batch, "input": list(shape), "methods": {}}
    f = forward_flops(net, shape) if spec_flops else None
    out = net.forward(x, backend="cuda")
    target = np.asarray(_host(out)).argmax(axis=1)
    target_dev = xp.asarray(target)  # on the device once, not per timed call
    peers = None
    if model is not None:
        try:
            peers = Peers(model, x_host, target, "cpu" if dev.sim else "cuda", tf32, canonizers)
        except Exception as exc:
            report.error(f"{name}: torch model", exc)
    report.line(f"  {'method':24s} {'relprop ms':>11s} {'images/s':>9s} {'GEMM frac':>9s}   "
                f"{'peer':14s} {'peer ms':>9s} {'peer/relprop':>12s}  agreement (samples within tol)")
    for method in methods:
        row = {}
        try:
            if method == "forward":
                fn, flops = (lambda: net.forward(x, backend="cuda")), f
            elif method == "pattern_stats":
                fn = lambda: relprop.PatternStats(net).update(x, backend="cuda")  # noqa: E731
                flops = None if f is None else f + pattern_gemm_flops(net, shape)
            else:
                explainer = relprop.Explainer(net, method, backend="cuda")
                fn = (lambda e=explainer: e(x, target_dev))
                flops = None if f is None else {"gradient": 2 * f, "lrp.epsilon_plus_flat": 3 * f}.get(method, 2 * f)
            t = dev.best(fn, repeats)
            row.update(relprop_ms=t * 1e3, images_per_s=batch / t)
            if flops is not None:
                row.update(tflops=flops * batch / t / 1e12)
                if report.ceil:
                    row.update(gemm_fraction=flops * batch / t / report.ceil["sgemm_flops"])
            peer_fn = None
            if peers is not None:
                peer_name, peer_fn = {"forward": ("torch", peers.forward),
                                      "gradient": ("torch autograd", peers.gradient),
                                      "lrp.epsilon_plus_flat": ("zennit", peers.zennit_epsilon_plus_flat),
                                      }.get(method, (None, None))
            if peer_fn is not None:
                try:
                    theirs = peer_fn().detach().cpu().numpy()
                    ours = np.asarray(_host(fn()))
                    row["agreement"] = _agreement(ours, theirs, PEER_TOL[method])
                    tp = dev.best(peer_fn, repeats)
                    row.update(peer=peer_name, peer_ms=tp * 1e3, peer_over_relprop=tp / t)
                except Exception as exc:
                    report.error(f"{name}: {peer_name} {method}", exc)
            result["methods"][method] = row
            agree = row.get("agreement", {})
            frac = row.get("gemm_fraction", float("nan"))
            report.line(f"  {method:24s} {t * 1e3:11.2f} {batch / t:9.1f} {frac:9.2f}   "
                        f"{row.get('peer', '-'):14s} {row.get('peer_ms', float('nan')):9.2f} "
                        f"{row.get('peer_over_relprop', float('nan')):12.2f}  "
                        + (f"max {agree['max_rel_err']:.1e} ({agree['samples_within_tol']:.0%})" if agree else ""))
        except Exception as exc:
            report.error(f"{name}: {method}", exc)
        dev.free()
    if peers is not None:
        peers.close()
    return result


def check_against_cpu(dev, net, shape):
    """cuda vs cpu backend on 2 images: max relative difference of forward and gradient."""
    import relprop

    x = np.random.default_rng(1).standard_normal((2,) + tuple(shape)).astype(np.float32)
    xd = dev.xp.asarray(x)
    out = {}
    for method in ("forward", "gradient"):
        if method == "forward":
            got, want = _host(net.forward(xd, backend="cuda")), net.forward(x, backend="cpu")
        else:
            got = _host(relprop.explain(net, xd, "gradient", backend="cuda"))
            want = relprop.explain(net, x, "gradient", backend="cpu")
        out[method] = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    return out


def _host(a):
    from relprop import _backend

    return _backend.to_numpy(a)


def resnet18(dev, batch, methods, repeats, report, tf32):
    """ResNet-18 at ``batch`` through relprop.from_torch (the model-import issue), or the reason it is skipped."""
    import relprop

    from_torch = getattr(relprop, "from_torch", None)
    if from_torch is None:
        return {"skipped": "relprop.from_torch is not available yet (the model-import issue)"}
    try:
        import torch
        import torchvision
    except ImportError as exc:
        return {"skipped": f"needs torch and torchvision: {exc}"}
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    net = from_torch(model, torch.zeros(1, 3, 224, 224))
    canonizers = []
    try:
        from tests.torch_models import import_zennit  # needs torch: imported here

        import_zennit()
        from zennit.torchvision import ResNetCanonizer

        canonizers = [ResNetCanonizer()]
    except Exception:  # zennit missing: the torch peers still run
        pass
    model = model.to("cpu" if dev.sim else "cuda")
    return bench_net(dev, "resnet18", net, (3, 224, 224), batch, methods, repeats, report, model=model,
                     canonizers=canonizers, tf32=tf32, spec_flops=False)


# ---------------------------------------------------------------------------------------------- report

class Report:
    """Prints lines, collects the JSON, rewrites it after every stage."""

    def __init__(self, path, budget_s):
        self.path = Path(path) if path else None
        self.data = {"errors": [], "skipped": []}
        self.ceil = None
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def line(self, text):
        print(text, flush=True)

    def error(self, where, exc):
        msg = f"{where}: {type(exc).__name__}: {exc}"
        self.data["errors"].append(msg)
        print(f"  ERROR {msg}", flush=True)
        traceback.print_exc(limit=4)

    def skip(self, what, why):
        self.data["skipped"].append(f"{what}: {why}")
        print(f"  skipped {what}: {why}", flush=True)

    def time_left(self):
        return float("inf") if not self.budget_s else self.budget_s - (time.perf_counter() - self.t0)

    def save(self):
        self.data["elapsed_s"] = time.perf_counter() - self.t0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))


def aims(data):
    """The issue's aims against this run's figures (None where not measured)."""
    vgg = data.get("nets", {}).get("vgg16", {}).get("methods", {})
    lrp = vgg.get("lrp.epsilon_plus_flat", {})
    convs = [r["fraction_of_sgemm"] for r in data.get("kernels", [])
             if r["family"] == "conv2d" and "fraction_of_sgemm" in r]
    return {
        "lrp_over_zennit": {"aim": AIMS["lrp_over_zennit"], "measured": lrp.get("peer_over_relprop")},
        "conv_fraction_of_sgemm": {"aim": AIMS["conv_fraction_of_sgemm"], "measured": min(convs) if convs else None},
        "pattern_stats_images_per_s": {"aim": AIMS["pattern_stats_images_per_s"],
                                       "measured": vgg.get("pattern_stats", {}).get("images_per_s")},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test; also under the simulator)")
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS), default=None,
                        help="nets to run (default: vgg16; tiny_vgg with --quick)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 5; 1 with --quick)")
    parser.add_argument("--json", default=None, help="write the results here (default: $OUT/gpu.json or "
                                                     "./gpu_out/gpu.json)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel-family figures")
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch and Zennit")
    parser.add_argument("--no-check", action="store_true", help="skip the cuda-vs-cpu check on 2 images")
    parser.add_argument("--resnet", choices=["auto", "yes", "no"], default="auto",
                        help="ResNet-18 at batch 64 via relprop.from_torch (auto: not with --quick)")
    parser.add_argument("--tf32", action="store_true", help="TF32 GEMMs on both sides (relprop and PyTorch)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="skip the later stages (ResNet, the cpu check) once this many seconds have passed")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    nets = args.nets or (["tiny_vgg"] if args.quick else ["vgg16"])
    out_dir = os.environ.get("OUT") or "gpu_out"
    report = Report(args.json or os.path.join(out_dir, "gpu.json"), args.budget_s)

    try:
        dev = Device()
    except Exception as exc:
        print(f"bench/gpu.py needs an NVIDIA GPU with CuPy and numba-cuda (or NUMBA_ENABLE_CUDASIM=1 --quick): "
              f"{type(exc).__name__}: {exc}")
        return 2
    import relprop
    from relprop import _config
    from relprop.kernels.cuda import _launch

    if dev.sim:
        # the simulator runs every thread of a block as a Python thread: small launches keep it quick
        _config.THREADS_PER_BLOCK, _config.CUDA_MAX_BLOCKS = 8, 3
        if not args.quick:
            print("bench/gpu.py: under the simulator only --quick shapes are practical; using --quick")
            args.quick, nets = True, args.nets or ["tiny_vgg"]
    _launch.set_tf32(bool(args.tf32))
    report.data.update(args=vars(args), relprop_file=relprop.__file__, env=environment(dev), tf32=bool(args.tf32))
    report.line("environment: " + ", ".join(f"{k}={v}" for k, v in report.data["env"].items()))
    report.line(f"relprop from {relprop.__file__}; TF32 {'on' if args.tf32 else 'off'}")
    report.save()

    ceil = report.ceil = ceilings(dev, args.quick, repeats)
    report.data["ceilings"] = ceil
    report.line(f"ceilings: cuBLAS SGEMM {ceil['sgemm_n']}^3 {ceil['sgemm_flops'] / 1e12:.2f} TFLOP/s; "
                f"device-to-device copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write)")
    report.save()

    if not args.no_kernels:
        report.line("kernel families (VGG-16-sized layers; fraction of this run's SGEMM rate or copy bandwidth):")
        report.data["kernels"] = kernel_families(dev, args.quick, repeats, ceil, report)
        report.save()

    report.data["nets"] = {}
    peers_ok = not args.no_peers
    if peers_ok:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            report.skip("torch and zennit", f"torch does not import: {exc}")
            peers_ok = False
    for name in nets:
        cfg = NETS[name]
        net, weights = random_net(cfg["spec"])
        model = None
        if peers_ok:
            try:
                model = torch_model(cfg["spec"], weights, "cpu" if dev.sim else "cuda")
            except Exception as exc:
                report.error(f"{name}: torch model", exc)
        report.line(f"{name} at batch {cfg['batch']} ({'x'.join(map(str, cfg['shape']))}):")
        report.data["nets"][name] = bench_net(dev, name, net, cfg["shape"], cfg["batch"], args.methods, repeats,
                                              report, model=model, tf32=args.tf32)
        del model
        report.save()

    run_resnet = args.resnet == "yes" or (args.resnet == "auto" and not args.quick)
    if run_resnet:
        if report.time_left() < 60:
            report.skip("resnet18", "time budget spent")
        else:
            report.line("resnet18 at batch 64 (3x224x224):")
            try:
                report.data["nets"]["resnet18"] = resnet18(dev, 64, args.methods, repeats, report, args.tf32)
                if "skipped" in report.data["nets"]["resnet18"]:
                    report.skip("resnet18", report.data["nets"]["resnet18"]["skipped"])
            except Exception as exc:
                report.error("resnet18", exc)
        report.save()

    if not args.no_check:
        if report.time_left() < 45:
            report.skip("cuda-vs-cpu check", "time budget spent")
        else:
            name = nets[0]
            try:
                net, _ = random_net(NETS[name]["spec"])
                diff = check_against_cpu(dev, net, NETS[name]["shape"])
                report.data["check_against_cpu"] = {"net": name, "max_rel_diff": diff}
                report.line(f"cuda vs cpu on 2 images of {name}: max relative difference {diff}")
            except Exception as exc:
                report.error("cuda-vs-cpu check", exc)

    report.data["aims"] = aims(report.data)
    report.line("aims: " + "; ".join(f"{k} {v['measured'] if v['measured'] is None else round(v['measured'], 3)} "
                                     f"(aim {v['aim']})" for k, v in report.data["aims"].items()))
    report.save()
    if report.path is not None:
        report.line(f"wrote {report.path}")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
