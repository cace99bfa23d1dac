"""The backends mirror each other: same names, same signatures; cpu kernels use the config's flags."""
import importlib
import inspect

import numba
import pytest

from relprop import _backend, _config


def _module(backend, family):
    try:
        return importlib.import_module(f"relprop.kernels.{backend}.{family}")
    except ModuleNotFoundError:
        return None


def _signature(fn):
    return inspect.signature(getattr(fn, "py_func", fn))


@pytest.mark.parametrize("family", _backend.FAMILIES)
def test_cpu_mirrors_reference(family):
    ref = _module("reference", family)
    cpu = _module("cpu", family)
    assert ref is not None, f"cpu/{family}.py has no reference twin"
    assert cpu is not None, f"reference/{family}.py has no cpu twin"
    assert sorted(ref.__all__) == sorted(cpu.__all__)
    for name in ref.__all__:
        assert _signature(getattr(ref, name)) == _signature(getattr(cpu, name)), name


def test_reference_imports_only_numpy():
    """The reference kernels import NumPy and each other (one im2col serves them all), nothing else."""
    import ast
    import pathlib

    root = pathlib.Path(importlib.import_module("relprop.kernels.reference").__file__).parent
    siblings = {p.stem for p in root.glob("*.py")}
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert (node.module or "") in siblings, f"{path.name} imports .{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path.name} imports outside reference/"
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    assert n.split(".")[0] in {"numpy", "__future__", "math", ""}, f"{path.name} imports {n}"


def test_cpu_kernels_use_config_flags_and_cache():
    seen = 0
    for family in _backend.FAMILIES:
        mod = _module("cpu", family)
        if mod is None:
            continue
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, numba.core.registry.CPUDispatcher):
                seen += 1
                flags = obj.targetoptions.get("fastmath")
                assert set(flags or ()) == set(_config.FASTMATH_FLAGS), f"{family}.{name}: fastmath={flags}"
                assert obj._cache is not None and type(obj._cache).__name__ != "NullCache", f"{family}.{name}: no cache"
    assert seen > 0
