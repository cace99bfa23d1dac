"""Validation at the public boundary: shapes, dtypes, finiteness, geometry.

Kernels below the boundary assume valid, contiguous input; everything a user can pass
wrongly is caught here with a message naming the argument, what was expected and what
was given.
"""
from __future__ import annotations

import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_array(name, x, ndim=None, where=""):
    """``x`` must be a float32/float64 array of ``ndim`` dimensions."""
    prefix = f"{where}: " if where else ""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{prefix}{name} must be a numpy or cupy array, got {type(x).__name__}")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{prefix}{name} has dtype {x.dtype}; expected float32 or float64 "
            f"(convert with {name}.astype(np.float32))"
        )
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in ndims:
            want = " or ".join(str(d) for d in ndims)
            raise ValueError(f"{prefix}{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    return x


def check_same_dtype(where="", **arrays):
    """All given (non-None) arrays share one float dtype."""
    items = [(k, v) for k, v in arrays.items() if v is not None]
    if not items:
        return None
    dt = np.dtype(items[0][1].dtype)
    for k, v in items[1:]:
        if np.dtype(v.dtype) != dt:
            prefix = f"{where}: " if where else ""
            raise TypeError(
                f"{prefix}{k} has dtype {v.dtype} but {items[0][0]} has {dt}; use one float dtype "
                f"for all arrays (e.g. {k}.astype({items[0][0]}.dtype))"
            )
    return dt


def check_shape(name, x, expected, where=""):
    """``x.shape`` equals ``expected``; ``None`` entries in ``expected`` match anything."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        prefix = f"{where}: " if where else ""
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{prefix}{name} has shape {shape}, expected {exp}")


def check_finite(name, x, where=""):
    """Raise ValueError naming the first NaN/Inf position of ``x``."""
    xp = _xp(x)
    if not bool(xp.isfinite(x).all()):
        bad = xp.argwhere(~xp.isfinite(x))[0]
        idx = tuple(int(i) for i in (bad.get() if hasattr(bad, "get") else bad))
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} contains NaN or Inf at index {idx}")


def _xp(x):
    from ._backend import array_namespace

    return array_namespace(x)


def pair(name, value, where="", minimum=0):
    """An int or a pair of ints -> a tuple of two ints >= ``minimum``."""
    prefix = f"{where}: " if where else ""
    given = value  # messages quote what the caller passed, not the expanded pair
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        a, b = value
        if isinstance(a, bool) or isinstance(b, bool):
            raise TypeError
        out = (int(a), int(b))
        if out != (a, b):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{prefix}{name} must be an int or a pair of ints, got {given!r}") from None
    if min(out) < minimum:
        raise ValueError(f"{prefix}{name} must be >= {minimum}, got {given!r}")
    return out


def conv_output_size(size, kernel, stride, padding, dilation=1, ceil_mode=False):
    """Output length of a convolution/pool along one axis (floor mode, or PyTorch's ceil mode,
    in which the last window must start inside the input or its left padding)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def check_window_geometry(where, in_hw, kernel, stride, padding, dilation=(1, 1), pool=False, ceil_mode=False):
    """Validate a sliding-window geometry and return the output size (Ho, Wo)."""
    out = []
    for axis, (n, k, s, p, d) in enumerate(zip(in_hw, kernel, stride, padding, dilation)):
        span = d * (k - 1) + 1
        if pool and p > k // 2:
            raise ValueError(
                f"{where}: padding {p} exceeds half the pool window {k} along axis {axis} "
                "(a window could see only padding)"
            )
        if span > n + 2 * p:
            raise ValueError(
                f"{where}: kernel extent {span} (kernel {k}, dilation {d}) is larger than the padded "
                f"input {n} + 2*{p} = {n + 2 * p} along axis {axis}"
            )
        out.append(conv_output_size(n, k, s, p, d, ceil_mode))
    return tuple(out)


def check_param(where, name, value, cond, expected):
    """Raise ValueError ``where: name=value; expected ...`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected {expected}")


def check_activations(layer_index, kind, array):
    """Raise ValueError when a layer's forward output holds NaN or Inf (an overflow, e.g. float32).

    Cheap on the good path: one sum over the array (NaN and Inf propagate into it); only when
    the sum is not finite does an elementwise check tell an overflow of the sum itself from
    non-finite entries.
    """
    xp = _xp(array)
    with np.errstate(over="ignore", invalid="ignore"):
        total = array.sum()
    if bool(xp.isfinite(total)) or bool(xp.isfinite(array).all()):
        return array
    dtype = np.dtype(array.dtype)
    hint = ("use float64 input (x.astype(np.float64)) or rescale x" if dtype == np.float32
            else "rescale x (or check the layer's weights)")
    raise ValueError(
        f"layer {layer_index} ({kind}): the forward pass produced NaN or Inf ({dtype} overflow); {hint}"
    )


def check_bool(where, name, value):
    """``value`` must be a bool (True/False or a NumPy bool): strings such as "no" are not."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{where}: {name} must be True or False, got {value!r}")


def check_finite_number(where, name, value, dtype=None):
    """A real, finite number (representable in ``dtype`` when given, e.g. float32 overflows past 3.4e38)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__}")
    ok = np.isfinite(float(value))
    if ok and dtype is not None:
        with np.errstate(over="ignore"):
            ok = bool(np.isfinite(np.asarray(value, dtype=dtype)))
    if not ok:
        what = f"a finite number (in {np.dtype(dtype)})" if dtype is not None else "a finite number"
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected {what}")
    return value


def check_real_array(where, name, a):
    """A real (not complex), numeric, finite array: relevance maps and curves given to metrics."""
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise TypeError(f"{where}: {name} must be an array, got {type(a).__name__}")
    kind = np.dtype(a.dtype).kind
    if kind == "c":
        raise TypeError(f"{where}: {name} is complex ({a.dtype}); expected real values")
    if kind not in "fiu":
        raise TypeError(f"{where}: {name} has dtype {a.dtype}; expected a real numeric array")
    if kind == "f":
        check_finite(name, a, where)
    return a


def check_int(where, name, value, minimum):
    """``value`` as an int >= ``minimum``: TypeError for a non-integer (bools too), ValueError below it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name}={value!r} is invalid; expected an int >= {minimum}")
    return int(value)
