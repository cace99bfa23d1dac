"""The ``relprop`` command line: ``relprop demo``, ``relprop explain``, ``relprop fit-patterns``.

``relprop demo`` runs :func:`relprop.demo.demo` (heatmaps of a zoo net and a table per
method) or, with ``--show``, one of the network-level views of :mod:`relprop.demo`.

``relprop explain`` runs one method on a user's net (saved with ``net.save``) or a zoo net
and an input stored as ``.npy``; it writes the relevance as ``.npy`` and optionally a PNG.
With ``--data X.zarr --out R.zarr`` it runs on Dask instead, chunk by chunk, resumable
(:func:`relprop.dist.explain`).

``relprop fit-patterns`` fits PatternNet's patterns over a ``.zarr`` or ``.npy`` data set on
Dask (:func:`relprop.dist.fit_patterns`) and writes them with ``Patterns.save``.  Both Dask
commands run on this machine without ``--scheduler`` and on a cluster with it.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .demo import DEMO_METHODS, VIEW_MODELS, VIEWS, _load_model, _method_options, _parse_option, demo

__all__ = ["main", "demo", "DEMO_METHODS"]


def explain_command(args):
    import relprop
    from . import viz

    if args.data is not None:
        return _dist_explain_command(args)
    if args.input is None:
        raise SystemExit("relprop explain: give --input FILE.npy (in memory) or --data X.zarr|X.npy (on Dask)")
    net, patterns, meta, _ = _load_model(args.model)
    if args.patterns:
        patterns = relprop.load_patterns(args.patterns, net)
    x = np.load(args.input, allow_pickle=False)
    if not isinstance(x, np.ndarray):
        raise SystemExit(f"relprop explain: --input {args.input} is not a .npy array file")
    if x.dtype.kind not in "biuf":
        raise SystemExit(f"relprop explain: --input {args.input} holds {x.dtype} values; expected real numbers "
                         "(a complex array would lose its imaginary part)")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    elif x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    single = x.ndim == net.input_ndim - 1
    if single:
        x = x[None]
    options = _method_options(args.method, net, patterns, meta, x, dict(args.option or []))
    R = relprop.explain(net, x, args.method, target=args.target, backend=args.backend, **options)
    R = np.asarray(R)
    np.save(args.out, R[0] if single else R)
    print(f"wrote {args.out} ({R.shape[0]} input(s), method {args.method})")
    if args.png:
        image_shape = tuple(meta["image_shape"]) if meta.get("image_shape") else None
        if R.shape[0] == 1:
            viz.save_heatmap(args.png, R[0], percentile=99.5, image_shape=image_shape)
        else:
            viz.grid(x, {args.method: R}, path=args.png, percentile=99.5, image_shape=image_shape)
        print(f"wrote {args.png}")
    return 0


# -- on Dask ----------------------------------------------------------------------------------------------
class _DaskSession:
    """``with _DaskSession(address) as client``: connect to ``--scheduler`` (or None: dask's local scheduler)."""

    def __init__(self, address, timeout):
        self.address, self.timeout, self.client = address, timeout, None

    def __enter__(self):
        from . import dist

        if self.address is None:
            print("relprop: no --scheduler given: running on this machine (dask's local scheduler)")
            return None
        try:
            self.client = dist.connect(self.address, timeout=self.timeout)
        except ConnectionError as exc:
            raise SystemExit(f"relprop: {exc}") from None
        n = len(self.client.scheduler_info().get("workers", {}))
        print(f"relprop: connected to {self.address} ({n} worker(s)); dashboard: {self.client.dashboard_link}")
        return self.client

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        return False


def _dask_data(dist, args, net, where):
    try:
        return dist.as_dask_array(args.data, chunk=args.chunk, net=net, where=where)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise SystemExit(str(exc)) from None


def fit_patterns_command(args):
    from . import dist

    net, _, _, _ = _load_model(args.model)
    t0 = time.perf_counter()
    with _DaskSession(args.scheduler, args.timeout) as client:
        data = _dask_data(dist, args, net, "relprop fit-patterns")
        print(f"relprop fit-patterns: {data.shape[0]} inputs {tuple(data.shape[1:])} in {data.numblocks[0]} "
              f"chunk(s) of up to {max(data.chunks[0])}")
        try:
            patterns = dist.fit_patterns(net, data, client=client, batch_size=args.batch_size, backend=args.backend,
                                         mean_y=args.mean_y, progress=True)
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"relprop fit-patterns: {exc}") from None
    patterns.save(args.out)
    print(f"wrote {args.out} (patterns of layers {list(patterns)} from {patterns.stats.n_inputs} inputs, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def _dist_explain_command(args):
    import relprop
    from . import dist

    net, patterns, meta, _ = _load_model(args.model)
    if args.patterns:
        patterns = relprop.load_patterns(args.patterns, net)
    t0 = time.perf_counter()
    with _DaskSession(args.scheduler, args.timeout) as client:
        data = _dask_data(dist, args, net, "relprop explain")
        options = _method_options(args.method, net, patterns, meta, data, dict(args.option or []))
        try:
            R = dist.explain(net, data, args.method, target=args.target, client=client, backend=args.backend,
                             out=args.out, overwrite=args.overwrite, progress=True, **options)
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"relprop explain: {exc}") from None
    print(f"wrote {args.out} ({R.shape[0]} input(s) in {R.numblocks[0]} chunk(s), method {args.method}, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def _add_dask_arguments(parser):
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="a Dask scheduler address, e.g. tcp://10.0.0.5:8786 (default: run on this machine)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="inputs per task (default: the zarr array's chunks; 256 for .npy)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the scheduler (default: 10)")


# -- entry point ------------------------------------------------------------------------------------------
def _parser():
    p = argparse.ArgumentParser(prog="relprop", description="Explain neural-network decisions (LRP, DTD, PatternNet, ...).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="explain a zoo net's samples with ten methods: a PNG grid and a table")
    d.add_argument("--model", default=None, help="zoo net name or path (default: detector; digits_cnn for the "
                   "features, maximize and tcav views)")
    d.add_argument("--show", default="heatmaps", choices=["heatmaps", "features", "maximize", "tcav", "lime"],
                   help="heatmaps (default): ten methods side by side; features: top-9 activations projected by "
                        "the DeconvNet; maximize: activation maximisation; tcav: concept tests; lime: superpixels")
    d.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated method names")
    d.add_argument("--backend", default=None, choices=["reference", "cpu", "cuda"])
    d.add_argument("--out", default=None, help="output folder or .png file (default: the current folder)")
    d.add_argument("--rows", type=int, default=4, help="samples shown in the figure (default: 4)")
    d.add_argument("--no-aopc", action="store_true", help="skip the perturbation (AOPC) column")
    d.add_argument("--no-quality", action="store_true", help="skip PatternNet's rho(S) table")

    e = sub.add_parser("explain", help="explain inputs from a .npy file with one method")
    e.add_argument("--model", required=True, help="a zoo net name or a .npz written by net.save")
    e.add_argument("--input", default=None, help=".npy file: one input or a batch in the net's layout")
    e.add_argument("--method", required=True, help="a method name (relprop.known_methods())")
    e.add_argument("--out", required=True, help="where to write the relevance (.npy)")
    e.add_argument("--png", default=None, help="also write the heatmap(s) as PNG")
    e.add_argument("--target", type=int, default=None, help="the class to explain (default: the argmax)")
    e.add_argument("--backend", default=None, choices=["reference", "cpu", "cuda"])
    e.add_argument("--patterns", default=None, help="patterns file for pattern.* methods (Patterns.save)")
    e.add_argument("--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                   help="a method option, e.g. --option epsilon=0.1 (repeatable)")
    e.add_argument("--data", default=None, help="instead of --input: a .zarr or .npy data set explained on Dask; "
                   "--out is then a zarr path, written chunk by chunk and resumed when rerun")
    e.add_argument("--overwrite", action="store_true", help="with --data: start --out afresh")
    _add_dask_arguments(e)

    f = sub.add_parser("fit-patterns", help="fit PatternNet's patterns over a .zarr or .npy data set on Dask")
    f.add_argument("--model", required=True, help="a zoo net name or a .npz written by net.save")
    f.add_argument("--data", required=True, help=".zarr or .npy: the inputs (N, ...) in the net's layout")
    f.add_argument("--out", required=True, help="where to write the patterns (.npz, read with relprop.load_patterns)")
    f.add_argument("--batch-size", type=int, default=256, help="inputs per forward pass inside a task")
    f.add_argument("--backend", default=None, choices=["reference", "cpu", "cuda"])
    f.add_argument("--mean-y", default=None, choices=["all", "regime"],
                   help="the mean of y in the two-component estimator (default: relprop.fit_patterns's)")
    _add_dask_arguments(f)

    sub.add_parser("methods", help="list the registered methods")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "demo" and args.show != "heatmaps":
        VIEWS[args.show](args.model or VIEW_MODELS[args.show], out=args.out, backend=args.backend)
        return 0
    if args.command == "demo":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        demo(args.model or "detector", methods, out=args.out, backend=args.backend, rows=args.rows,
             aopc=not args.no_aopc,
             quality=not args.no_quality)
        return 0
    if args.command == "explain":
        return explain_command(args)
    if args.command == "fit-patterns":
        return fit_patterns_command(args)
    import relprop

    print("\n".join(relprop.known_methods()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
