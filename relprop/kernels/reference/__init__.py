"""Pure-NumPy reference kernels: the test oracles and the teaching text.

Every function here reads like its equation in docs/conventions.md and is deliberately not fast.
The ``cpu`` and ``cuda`` subpackages export the same names with the same signatures;
the tests hold them to these results.  This subpackage imports only NumPy.

Every kernel has the signature ``(inputs..., scalars..., out) -> out``: the caller
(:mod:`relprop.kernels`) allocates ``out``.
"""
