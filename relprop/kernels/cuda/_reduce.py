"""Deterministic sums on the GPU without atomics (shared by the train and patterns twins).

``sum_outer(a, out)`` sums a (A, R, M) array over A and M into out (R,): pass 1 gives
each (r, segment) one thread that sums a fixed-length run of the flattened (A·M) axis
in order; pass 2 gives each r one thread that adds its segment partials in order.  The
summation order depends only on the shapes, so results are bitwise reproducible.
"""
from numba import cuda

from ._launch import empty, launch, scalar

#: items one thread of pass 1 sums (a fixed constant: it fixes the summation order)
SEGMENT = 256


@cuda.jit(cache=True)
def _segment_sums_kernel(a, seg, zero, partial):
    # a (A, R, M); partial (R, S): partial[r, s] = sum of a[., r, .] over flat items [s*seg, (s+1)*seg)
    n_inner = a.shape[2]
    n_items = a.shape[0] * n_inner
    n_seg = partial.shape[1]
    for k in range(cuda.grid(1), partial.size, cuda.gridsize(1)):
        r = k // n_seg
        s = k % n_seg
        t1 = (s + 1) * seg if (s + 1) * seg < n_items else n_items
        acc = zero
        for t in range(s * seg, t1):
            acc += a[t // n_inner, r, t % n_inner]
        partial[r, s] = acc


@cuda.jit(cache=True)
def _row_sums_kernel(partial, accumulate, out):
    # out[r] (+)= sum_s partial[r, s], in order; one thread per r
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
    n_seg = -(-n_items // SEGMENT)
    partial = empty(out, (a.shape[1], n_seg))
    launch(_segment_sums_kernel, partial.size, a, SEGMENT, scalar(out.dtype, 0), partial)
    launch(_row_sums_kernel, out.size, partial, bool(accumulate), out)
    return out
