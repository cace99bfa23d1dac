"""Deterministic sums on the GPU without atomics (shared by the train and patterns twins).

``sum_outer(a, out)`` sums a (A, R, M) array over A and M into out (R,).  With the flat
item index t = i·M + m of a[i, r, m]:

- pass 1 gives each (r, lane l) one thread that sums the items t ≡ l (mod LANES) in
  increasing t: neighbouring lanes read neighbouring items, so a warp's loads are
  coalesced (a[i, r, m], a[i, r, m+1], ...), and each thread walks (i, m) by additions
  (no division per item);
- pass 2 gives each r one thread that adds its LANES partials in lane order.

The summation order depends only on the shapes and the constant LANES, never on the
launch configuration, so results are bitwise reproducible.
"""
from numba import cuda

from ... import _config
from ._launch import empty, launch, launch_grid, scalar

#: partial sums per output (a fixed constant: it fixes the summation order)
LANES = 256


@cuda.jit(cache=_config.NUMBA_CACHE)
def _lane_sums_kernel(a, zero, partial):
    # a (A, R, M); partial (R, LANES): partial[r, l] = Σ a[t // M, r, t % M] over t ≡ l (mod LANES), t ascending.
    # Blocks over r (y), threads over lanes (x).
    n_outer, n_inner = a.shape[0], a.shape[2]
    n_lanes = partial.shape[1]
    x0, y0, _ = cuda.grid(3)
    sx, sy, _ = cuda.gridsize(3)
    step_i = n_lanes // n_inner  # a step of LANES items = step_i rows of M plus step_m items
    step_m = n_lanes - step_i * n_inner
    for r in range(y0, partial.shape[0], sy):
        for lane in range(x0, n_lanes, sx):
            i = lane // n_inner
            m = lane - i * n_inner
            acc = zero
            while i < n_outer:
                acc += a[i, r, m]
                i += step_i
                m += step_m
                if m >= n_inner:
                    m -= n_inner
                    i += 1
            partial[r, lane] = acc


@cuda.jit(cache=_config.NUMBA_CACHE)
def _row_sums_kernel(partial, accumulate, out):
    # out[r] (+)= sum_l partial[r, l], in order; one thread per r
    for r in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        acc = partial[r, 0]
        for s in range(1, partial.shape[1]):
            acc += partial[r, s]
        if accumulate:
            out[r] += acc
        else:
            out[r] = acc


def sum_outer(a, out, accumulate=False):
    """out[r] (+)= Σ_{i, m} a[i, r, m] for a (A, R, M), out (R,); deterministic, no atomics."""
    n_items = a.shape[0] * a.shape[2]
    if n_items == 0:
        if not accumulate:
            out[...] = 0
        return out
    partial = empty(out, (a.shape[1], LANES))
    launch_grid(_lane_sums_kernel, (1,) + partial.shape, a, scalar(out.dtype, 0), partial)
    launch(_row_sums_kernel, out.size, partial, bool(accumulate), out)
    return out
