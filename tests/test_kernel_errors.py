"""Bad input at the public kernel entry points (:mod:`relprop.kernels`): one case per rule.

Every message names the function, the argument, what was expected and what was given
(STYLE.md §H).  Validation happens before dispatch, so all cases run on the reference
backend too: nothing here needs compiled kernels.
"""
import os
import re

import numpy as np
import pytest

import relprop.kernels as K


def f32(*shape):
    return np.ones(shape, np.float32)


def f64(*shape):
    return np.ones(shape, np.float64)


def with_bad(a, index, value=np.nan):
    a = a.copy()
    a[index] = value
    return a


# (call, exception type, regex the message must match)
CASES = {
    # --- wrong number of dimensions
    "dense x ndim": (lambda: K.dense_forward(f32(2, 3, 1), f32(4, 3)), ValueError,
                     r"dense_forward: x must have 2 dimensions, got shape \(2, 3, 1\)"),
    "dense_vjp w ndim": (lambda: K.dense_vjp(f32(2, 4), f32(4)), ValueError,
                         r"dense_vjp: w must have 2 dimensions, got shape \(4,\)"),
    "conv x ndim": (lambda: K.conv2d_forward(f32(1, 5, 5), f32(2, 1, 3, 3)), ValueError,
                    r"conv2d_forward: x must have 4 dimensions, got shape \(1, 5, 5\)"),
    "conv w ndim": (lambda: K.conv2d_forward(f32(1, 1, 5, 5), f32(2, 1, 3)), ValueError,
                    r"conv2d_forward: w must have 4 dimensions"),
    "maxpool x ndim": (lambda: K.maxpool2d_forward(f32(4, 4), 2), ValueError,
                       r"maxpool2d_forward: x must have 4 dimensions, got shape \(4, 4\)"),
    "avgpool_vjp g ndim": (lambda: K.avgpool2d_vjp(f32(2, 2), (1, 1, 4, 4), 2), ValueError,
                           r"avgpool2d_vjp: g must have 4 dimensions"),
    # --- wrong shape: names the argument, the expected and the actual shape
    "dense w shape": (lambda: K.dense_forward(f32(2, 3), f32(4, 5)), ValueError,
                      r"dense_forward: w has shape \(4, 5\), expected \(\*, 3\)"),
    "dense b shape": (lambda: K.dense_forward(f32(2, 3), f32(4, 3), f32(3)), ValueError,
                      r"dense_forward: b has shape \(3,\), expected \(4\)"),
    "dense_vjp g shape": (lambda: K.dense_vjp(f32(2, 5), f32(4, 3)), ValueError,
                          r"dense_vjp: g has shape \(2, 5\), expected \(\*, 4\)"),
    "conv channels": (lambda: K.conv2d_forward(f32(1, 3, 5, 5), f32(2, 1, 3, 3)), ValueError,
                      r"conv2d_forward: w has shape \(2, 1, 3, 3\), expected \(K, C=3, kh, kw\)"),
    "conv b shape": (lambda: K.conv2d_forward(f32(1, 1, 5, 5), f32(2, 1, 3, 3), f32(3)), ValueError,
                     r"conv2d_forward: b has shape \(3,\), expected \(2\)"),
    "conv_vjp g shape": (lambda: K.conv2d_vjp(f32(1, 2, 4, 4), f32(2, 1, 3, 3), (1, 1, 5, 5)), ValueError,
                         r"conv2d_vjp: g has shape \(1, 2, 4, 4\), expected \(1, 2, 3, 3\)"),
    "conv_vjp input_shape": (lambda: K.conv2d_vjp(f32(1, 2, 3, 3), f32(2, 1, 3, 3), (1, 5, 5)), ValueError,
                             r"conv2d_vjp: input_shape must be \(N, C, H, W\), got \(1, 5, 5\)"),
    "avgpool_vjp g shape": (lambda: K.avgpool2d_vjp(f32(1, 1, 3, 3), (1, 1, 4, 4), 2), ValueError,
                            r"avgpool2d_vjp: g has shape \(1, 1, 3, 3\), expected \(1, 1, 2, 2\)"),
    "avgpool_vjp input_shape": (lambda: K.avgpool2d_vjp(f32(1, 1, 2, 2), (1, 4, 4), 2), ValueError,
                                r"avgpool2d_vjp: input_shape must be \(N, C, H, W\), got \(1, 4, 4\)"),
    "relu g/z shapes": (lambda: K.relu_backward_gradient(f32(2, 3), f32(3, 2)), ValueError,
                        r"relu_backward_gradient: z has shape \(3, 2\), expected \(2, 3\) \(the shape of g\)"),
    "guided g/z shapes": (lambda: K.relu_backward_guided(f32(4), f32(5)), ValueError,
                          r"relu_backward_guided: z has shape \(5,\), expected \(4,\)"),
    "divide r/z shapes": (lambda: K.stabilized_divide(f32(2, 2), f32(2, 3)), ValueError,
                          r"stabilized_divide: z has shape \(2, 3\), expected \(2, 2\)"),
    # --- dtypes: floats only (never silently upcast), one dtype across arguments
    "int x": (lambda: K.dense_forward(np.ones((2, 3), np.int64), f32(4, 3)), TypeError,
              r"dense_forward: x has dtype int64; expected float32 or float64 \(convert with x\.astype"),
    "int pool": (lambda: K.maxpool2d_forward(np.ones((1, 1, 4, 4), np.int32), 2), TypeError,
                 r"maxpool2d_forward: x has dtype int32; expected float32 or float64"),
    "float16 relu": (lambda: K.relu_forward(np.ones(3, np.float16)), TypeError,
                     r"relu_forward: x has dtype float16; expected float32 or float64"),
    "bool g": (lambda: K.relu_backward_deconvnet(np.ones(3, bool)), TypeError, r"g has dtype bool"),
    "mixed dense": (lambda: K.dense_forward(f32(2, 3), f64(4, 3)), TypeError,
                    r"dense_forward: w has dtype float64 but x has float32; use one float dtype"),
    "mixed conv bias": (lambda: K.conv2d_forward(f64(1, 1, 5, 5), f64(2, 1, 3, 3), f32(2)), TypeError,
                        r"conv2d_forward: b has dtype float32 but x has float64"),
    "mixed divide": (lambda: K.stabilized_divide(f64(3), f32(3)), TypeError,
                     r"stabilized_divide: z has dtype float32 but r has float64"),
    "list input": (lambda: K.relu_forward([1.0, 2.0]), TypeError,
                   r"relu_forward: x must be a numpy or cupy array, got list"),
    "list z": (lambda: K.relu_backward_gradient(f32(2), [1.0, 2.0]), TypeError,
               r"relu_backward_gradient: z must be a numpy or cupy array, got list"),
    "matrix": (lambda: K.relu_forward(np.matrix([[1.0]])), TypeError, r"matrix is not supported"),
    "masked": (lambda: K.relu_forward(np.ma.masked_array([1.0, 2.0], [0, 1])), TypeError,
               r"MaskedArray is not supported"),
    # --- NaN/Inf: ValueError with the first bad index
    "nan x": (lambda: K.dense_forward(with_bad(f32(2, 3), (1, 2)), f32(4, 3)), ValueError,
              r"dense_forward: x contains NaN or Inf at index \(1, 2\)"),
    "inf w": (lambda: K.conv2d_forward(f32(1, 1, 5, 5), with_bad(f32(2, 1, 3, 3), (1, 0, 2, 1), np.inf)),
              ValueError, r"conv2d_forward: w contains NaN or Inf at index \(1, 0, 2, 1\)"),
    "-inf pool": (lambda: K.maxpool2d_forward(with_bad(f64(1, 2, 4, 4), (0, 1, 3, 0), -np.inf), 2),
                  ValueError, r"maxpool2d_forward: x contains NaN or Inf at index \(0, 1, 3, 0\)"),
    "nan unpool g": (lambda: K.maxunpool2d(with_bad(f32(1, 1, 2, 2), (0, 0, 0, 1)), np.zeros((1, 1, 2, 2), np.int64),
                                           (1, 1, 4, 4)), ValueError, r"maxunpool2d: g contains NaN or Inf at index"),
    "nan z": (lambda: K.stabilized_divide(f32(3), with_bad(f32(3), 2)), ValueError,
              r"stabilized_divide: z contains NaN or Inf at index \(2,\)"),
    # --- geometry: stride/padding/dilation/kernel values
    "conv stride 0": (lambda: K.conv2d_forward(f32(1, 1, 5, 5), f32(2, 1, 3, 3), stride=0), ValueError,
                      r"conv2d_forward: stride must be >= 1, got 0"),
    "conv padding < 0": (lambda: K.conv2d_forward(f32(1, 1, 5, 5), f32(2, 1, 3, 3), padding=(0, -1)), ValueError,
                         r"conv2d_forward: padding must be >= 0, got \(0, -1\)"),
    "conv dilation 0": (lambda: K.conv2d_forward(f32(1, 1, 5, 5), f32(2, 1, 3, 3), dilation=(1, 0)), ValueError,
                        r"conv2d_forward: dilation must be >= 1"),
    "conv stride float": (lambda: K.conv2d_forward(f32(1, 1, 5, 5), f32(2, 1, 3, 3), stride=1.5), TypeError,
                          r"conv2d_forward: stride must be an int or a pair of ints, got 1\.5"),
    "conv stride triple": (lambda: K.conv2d_forward(f32(1, 1, 5, 5), f32(2, 1, 3, 3), stride=(1, 1, 1)), TypeError,
                           r"stride must be an int or a pair of ints, got \(1, 1, 1\)"),
    "pool kernel 0": (lambda: K.maxpool2d_forward(f32(1, 1, 4, 4), 0), ValueError,
                      r"maxpool2d_forward: kernel must be >= 1, got 0"),
    "pool stride 0": (lambda: K.avgpool2d_forward(f32(1, 1, 4, 4), 2, stride=(2, 0)), ValueError,
                      r"avgpool2d_forward: stride must be >= 1, got \(2, 0\)"),
    "pool padding < 0": (lambda: K.maxpool2d_forward(f32(1, 1, 4, 4), 2, padding=-1), ValueError,
                         r"maxpool2d_forward: padding must be >= 0, got -1"),
    # --- kernel larger than the padded input
    "conv kernel too big": (lambda: K.conv2d_forward(f32(1, 1, 5, 3), f32(2, 1, 3, 5), padding=(0, 0)), ValueError,
                            r"conv2d_forward: kernel extent 5 \(kernel 5, dilation 1\) is larger than the padded "
                            r"input 3 \+ 2\*0 = 3 along axis 1"),
    "conv dilated too big": (lambda: K.conv2d_forward(f32(1, 1, 4, 4), f32(2, 1, 2, 2), dilation=4), ValueError,
                             r"kernel extent 5 \(kernel 2, dilation 4\) is larger than the padded input 4"),
    "conv_vjp kernel too big": (lambda: K.conv2d_vjp(f32(1, 2, 1, 1), f32(2, 1, 3, 3), (1, 1, 2, 2)), ValueError,
                                r"conv2d_vjp: kernel extent 3 .* larger than the padded input 2"),
    "maxpool kernel too big": (lambda: K.maxpool2d_forward(f32(1, 1, 2, 5), 3), ValueError,
                               r"maxpool2d_forward: kernel extent 3 .* padded input 2 \+ 2\*0 = 2 along axis 0"),
    "avgpool_vjp kernel too big": (lambda: K.avgpool2d_vjp(f32(1, 1, 1, 1), (1, 1, 3, 1), (2, 2)), ValueError,
                                   r"avgpool2d_vjp: kernel extent 2 .* along axis 1"),
    # --- pool padding > kernel // 2 (a window could see only padding)
    "maxpool padding": (lambda: K.maxpool2d_forward(f32(1, 1, 6, 6), 2, padding=(0, 2)), ValueError,
                        r"maxpool2d_forward: padding 2 exceeds half the pool window 2 along axis 1"),
    "avgpool padding": (lambda: K.avgpool2d_forward(f32(1, 1, 6, 6), 3, padding=2), ValueError,
                        r"avgpool2d_forward: padding 2 exceeds half the pool window 3 along axis 0"),
    # --- switches of maxunpool2d
    "switches shape": (lambda: K.maxunpool2d(f32(1, 1, 2, 2), np.zeros((1, 1, 2, 3), np.int64), (1, 1, 4, 4)),
                       ValueError, r"maxunpool2d: switches has shape \(1, 1, 2, 3\), expected \(1, 1, 2, 2\)"),
    "switches dtype": (lambda: K.maxunpool2d(f32(1, 1, 2, 2), np.zeros((1, 1, 2, 2), np.int32), (1, 1, 4, 4)),
                       TypeError, r"maxunpool2d: switches has dtype int32, expected int64"),
    "switches float": (lambda: K.maxunpool2d(f32(1, 1, 2, 2), f32(1, 1, 2, 2), (1, 1, 4, 4)),
                       TypeError, r"maxunpool2d: switches has dtype float32, expected int64"),
    "switches list": (lambda: K.maxunpool2d(f32(1, 1, 1, 1), [[[[0]]]], (1, 1, 4, 4)),
                      TypeError, r"maxunpool2d: switches must be an int64 array, got list"),
    "switches too large": (lambda: K.maxunpool2d(f32(1, 1, 2, 2), np.full((1, 1, 2, 2), 16, np.int64), (1, 1, 4, 4)),
                           ValueError, r"maxunpool2d: switches must lie in \[0, H\*W=16\) for input_shape "
                                       r"\(1, 1, 4, 4\), got values in \[16, 16\]"),
    "switches negative": (lambda: K.maxunpool2d(f32(1, 1, 1, 2), np.array([[[[-1, 3]]]]), (1, 1, 2, 2)),
                          ValueError, r"switches must lie in \[0, H\*W=4\).*got values in \[-1, 3\]"),
    "unpool input_shape": (lambda: K.maxunpool2d(f32(1, 2, 2, 2), np.zeros((1, 2, 2, 2), np.int64), (1, 3, 4, 4)),
                           ValueError, r"maxunpool2d: input_shape \(1, 3, 4, 4\) must be \(N=1, C=2, H, W\)"),
    # --- scalar parameters
    "epsilon < 0": (lambda: K.stabilized_divide(f32(2), f32(2), -1e-3), ValueError,
                    r"stabilized_divide: epsilon=-0\.001 is invalid; expected a finite number >= 0"),
    "epsilon nan": (lambda: K.stabilized_divide(f32(2), f32(2), float("nan")), ValueError,
                    r"stabilized_divide: epsilon=nan is invalid"),
    "epsilon str": (lambda: K.stabilized_divide(f32(2), f32(2), "0.1"), ValueError,
                    r"stabilized_divide: epsilon='0\.1' is invalid"),
    # --- backend
    "unknown backend": (lambda: K.relu_forward(f32(3), backend="gpu"), ValueError,
                        r"unknown backend 'gpu'; expected one of \('reference', 'cpu', 'cuda'\) or None"),
    "unknown backend pool": (lambda: K.maxpool2d_forward(f32(1, 1, 2, 2), 2, backend="numba"), ValueError,
                             r"unknown backend 'numba'"),
}


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises(case):
    call, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_no_finite_check_lets_nan_through():
    x = with_bad(f32(1, 1, 2, 2), (0, 0, 1, 1))
    out = K.avgpool2d_forward(x, 2, check_finite=False, backend="reference")
    assert np.isnan(out).all()


def test_validation_before_dispatch_keeps_inputs_untouched():
    x = with_bad(f64(2, 3), (0, 0))
    before = x.copy()
    with pytest.raises(ValueError):
        K.relu_forward(x)
    np.testing.assert_array_equal(x, before)


def _cuda_reachable():
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # pragma: no cover - numba built without CUDA support
        return False


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"),
                    reason="the CUDA simulator serves backend='cuda' for numpy input")
@pytest.mark.skipif(_cuda_reachable(), reason="a GPU is present: backend='cuda' is available")
def test_cuda_backend_without_gpu_raises_runtime_error():
    with pytest.raises(RuntimeError, match=re.escape("CUDA backend requested but")):
        K.relu_forward(f32(3), backend="cuda")
    with pytest.raises(RuntimeError, match="no GPU is available"):
        K.maxpool2d_forward(f32(1, 1, 2, 2), 2, backend="cuda")
