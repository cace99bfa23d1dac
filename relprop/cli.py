"""The ``relprop`` command line: ``relprop demo`` and ``relprop explain``.

``relprop demo`` explains a zoo net's held-out samples with ten methods, writes a grid of
heatmaps (PNG) and prints a table per method: time per image, the conservation error of
the relevance methods, where the positive relevance lies (for the ``detector``: on the
half with the 0-3 digit or on the distractor), AOPC of region perturbation, and
PatternNet's signal-estimator quality ρ(S) per layer.

``relprop explain`` runs one method on a user's net (saved with ``net.save``) or a zoo net
and an input stored as ``.npy``; it writes the relevance as ``.npy`` and optionally a PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "demo", "DEMO_METHODS"]

DEMO_METHODS = ("gradient", "gradient_x_input", "deconvnet", "guided_backprop", "lrp.epsilon",
                "lrp.epsilon_plus_flat", "lrp.alpha_beta", "dtd.box", "pattern.net", "pattern.attribution")

#: column titles of the figure
TITLES = {
    "gradient": "Gradient", "gradient_x_input": "Gradient × Input", "deconvnet": "DeconvNet",
    "guided_backprop": "Guided Backprop", "lrp.epsilon": "LRP-ε", "lrp.epsilon_plus_flat": "LRP ε + z⁺ + flat",
    "lrp.alpha_beta": "LRP-α2β1", "dtd.box": "DTD zᴮ", "pattern.net": "PatternNet",
    "pattern.attribution": "PatternAttribution", "integrated_gradients": "Integrated Gradients",
    "smoothgrad": "SmoothGrad", "lrp.epsilon_gamma_box": "LRP ε + γ + zᴮ", "dtd.zplus": "DTD z⁺",
}


def _is_relevance(method):
    """Methods whose heatmap should sum to f_c(x) (the LRP/DTD family and PatternAttribution)."""
    return method.startswith(("lrp.", "dtd.")) or method == "pattern.attribution"


# -- loading models and options ------------------------------------------------------------------
def _load_model(spec):
    """(net, patterns or None, meta, samples dict) from a zoo name or a ``.npz`` path."""
    from . import zoo

    if spec in zoo.NAMES or Path(spec).exists():
        m = zoo.load(spec)
        return m.net, m.patterns, m.meta, {"x": m.x, "y": m.y, "mask": m.masks}
    raise SystemExit(f"relprop: --model {spec!r} is neither a zoo net ({', '.join(zoo.NAMES)}) nor an existing file")


def _method_options(method, net, patterns, meta, x, extra=None):
    """Options a method needs: the patterns for pattern.*, the input box for *box methods.

    The box is the net's declared ``input_range`` (zoo meta), else the range of ``x``.
    """
    opts = {}
    if method.startswith("pattern."):
        if patterns is None:
            raise ValueError(f"{method} needs fitted patterns (none shipped for this net; fit them with "
                             "relprop.fit_patterns and pass --patterns FILE)")
        opts["patterns"] = patterns
    if method.endswith("box"):
        low, high = meta.get("input_range") or (float(np.min(x)), float(np.max(x)))
        opts.update(low=float(low), high=float(high))
    opts.update(extra or {})
    return opts


def _parse_option(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # a plain string
    return key.strip(), value


# -- demo ---------------------------------------------------------------------------------------------
def _positive_fraction(R, mask):
    """Per sample: the share of positive relevance inside ``mask`` (NaN when there is none)."""
    n = R.shape[0]
    pos = np.maximum(R.reshape(n, -1).astype(np.float64), 0)
    total = pos.sum(axis=1)
    inside = (pos * mask.reshape(n, -1)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def _pick_rows(y, mask, rows):
    """Sample indices for the figure: different classes first, targets on both sides."""
    order = []
    left = None if mask is None else mask.reshape(mask.shape[0], -1)[:, 0].astype(bool)
    seen = set()
    for i in range(len(y)):
        key = (int(y[i]), None if left is None else bool(left[i]))
        if int(y[i]) not in {k[0] for k in seen} and (left is None or sum(k[1] == key[1] for k in seen) < (rows + 1) // 2):
            seen.add(key)
            order.append(i)
        if len(order) == rows:
            break
    for i in range(len(y)):
        if len(order) == rows:
            break
        if i not in order:
            order.append(i)
    return order


def _signal_quality_data(model_name, samples):
    """Held-out inputs for ρ(S): fresh test images when scikit-learn is there, else the samples."""
    if model_name == "detector":
        try:
            from .nets import data

            return data.detection("test", 1024, seed=3)[0]
        except ImportError:
            pass
    return samples["x"]


def demo(model="detector", methods=DEMO_METHODS, out=None, backend=None, rows=4, aopc=True, quality=True,
         stream=None):
    """Run the demo; return ``(png_path, table rows)`` (see the module doc)."""
    import relprop

    stream = sys.stdout if stream is None else stream
    from . import viz

    t_start = time.perf_counter()
    net, patterns, meta, samples = _load_model(model)
    name = meta.get("name", str(model))
    x, y, mask = samples["x"], samples["y"], samples["mask"]
    if x is None:
        raise SystemExit(f"relprop demo: {model!r} ships no samples")
    known = set(relprop.known_methods())
    logits = net.forward(x, backend=backend)
    target = np.argmax(logits, axis=1)
    f_c = logits[np.arange(len(x)), target].astype(np.float64)
    print(f"relprop demo: {name} -- {meta.get('description', '')}", file=stream)
    if "test_score" in meta:
        print(f"  held-out {meta.get('metric', 'accuracy')}: {meta['test_score']:.4f};  {len(x)} samples, "
              f"predicted = label on {np.mean(target == y):.0%}", file=stream)

    heatmaps, rows_out, notes = {}, [], []
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"relprop demo: unknown method(s) {unknown}; known: {', '.join(sorted(known))}")
    for method in methods:
        try:
            explainer = relprop.Explainer(net, method, backend=backend, **_method_options(method, net, patterns, meta, x))
            explainer(x[:2], target=target[:2])  # warm-up: JIT compile and cached weights
            t0 = time.perf_counter()
            R = explainer(x, target=target)
            per_image = (time.perf_counter() - t0) / len(x)
        except (ValueError, TypeError) as exc:
            notes.append(f"{method}: skipped ({exc})")
            continue
        R = np.asarray(R)
        heatmaps[method] = R
        row = {"method": method, "ms_per_image": 1e3 * per_image}
        if _is_relevance(method):
            total = R.reshape(len(x), -1).sum(axis=1, dtype=np.float64)
            row["conservation"] = float(np.mean(np.abs(total - f_c) / np.maximum(np.abs(f_c), 1e-12)))
        if mask is not None:
            frac = _positive_fraction(R, mask)
            row["target"] = float(np.nanmean(frac))
            row["distractor"] = float(1 - np.nanmean(frac))
        rows_out.append(row)

    random_aopc = None
    if aopc and rows_out:
        try:
            from .metrics import aopc as _aopc, perturbation_curve
        except ImportError:
            aopc = False
        else:
            patch, steps = _aopc_geometry(x)
            for row in rows_out:
                curve = perturbation_curve(net, x, heatmaps[row["method"]], target=target, patch=patch, steps=steps,
                                           seed=0, backend=backend)
                row["aopc"] = _aopc(curve)
            curve = perturbation_curve(net, x, heatmaps[rows_out[0]["method"]], target=target, patch=patch,
                                       steps=steps, order="random", seed=0, backend=backend)
            random_aopc = _aopc(curve)

    _print_table(rows_out, mask is not None, aopc, random_aopc, stream, x)
    for note in notes:
        print(f"  note: {note}", file=stream)

    if quality and patterns is not None:
        try:
            from .patterns import signal_quality
        except ImportError:
            pass
        else:
            q = signal_quality(net, patterns, _signal_quality_data(name, samples), backend=backend)
            print("\nPatternNet signal estimators, quality rho(S) per layer (higher is better; "
                  "S_x leaves no distractor, so rho is undefined):", file=stream)
            print(_indent(str(q)), file=stream)

    png = _png_path(out, name)
    if heatmaps:
        picked = _pick_rows(y, mask, min(rows, len(x)))
        classes = meta.get("classes")
        labels = [f"class {classes[target[i]] if classes else target[i]}" for i in picked]
        image_shape = tuple(meta["image_shape"]) if meta.get("image_shape") else None
        fig_title = _figure_title(name, meta)
        footnote = ("red: positive relevance (evidence for the class), blue: negative; each heatmap scaled "
                    "symmetrically to its 99.5th percentile of |R|")
        if mask is not None:
            footnote += "; green box: the half holding the target digit"
        viz.grid(x[picked], {TITLES.get(m, m): heatmaps[m][picked] for m in heatmaps}, path=png,
                 row_titles=labels, percentile=99.5, blend=0.3, image_shape=image_shape, title=fig_title, footnote=footnote,
                 outline=None if mask is None else _outline(mask[picked], image_shape))
        print(f"\nwrote {png}", file=stream)
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s", file=stream)
    return png, rows_out


def _aopc_geometry(x):
    """Patch size and number of perturbation steps: 4x4 patches on images, the first quarter of them."""
    if x.ndim == 4:
        h, w = x.shape[2:]
        patch = 4 if min(h, w) >= 16 else 1
        tiles = -(-h // patch) * -(-w // patch)
    else:
        patch, tiles = 1, x.shape[1]
    return patch, max(1, min(tiles, tiles // 4))


def _outline(mask, image_shape):
    """Masks as (N, H, W) booleans (channels merged)."""
    m = np.asarray(mask)
    m = m.reshape((m.shape[0],) + (tuple(image_shape) if image_shape else m.shape[1:]))
    return m.any(axis=1) if m.ndim == 4 else m


def _figure_title(name, meta):
    if name == "detector":
        return ("relprop: which digit 0-3 is in the image? The other half holds a distractor 4-9 "
                f"(zoo net 'detector', held-out accuracy {meta.get('test_score', float('nan')):.1%})")
    return f"relprop: explanations of the zoo net '{name}'"


def _png_path(out, name):
    if out is None:
        return Path.cwd() / f"relprop_demo_{name}.png"
    out = Path(out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    return out / f"relprop_demo_{name}.png"


def _indent(text, pad="  "):
    return "\n".join(pad + line for line in text.splitlines())


def _print_table(rows, with_mask, with_aopc, random_aopc, stream, x):
    head = f"  {'method':<24}{'ms/image':>9}{'conserv. err':>14}"
    if with_mask:
        head += f"{'R+ target':>11}{'R+ distr.':>11}"
    if with_aopc:
        head += f"{'AOPC':>8}"
    print("\n" + head, file=stream)
    print("  " + "-" * (len(head) - 2), file=stream)
    for r in rows:
        line = f"  {r['method']:<24}{r['ms_per_image']:>9.2f}"
        line += f"{r['conservation']:>14.1e}" if "conservation" in r else f"{'-':>14}"
        if with_mask:
            line += f"{r['target']:>11.1%}{r['distractor']:>11.1%}"
        if with_aopc:
            line += f"{r['aopc']:>8.2f}" if "aopc" in r else f"{'-':>8}"
        print(line, file=stream)
    print("  conserv. err = mean |sum_p R_p - f_c(x)| / |f_c(x)| (relevance methods only)", file=stream)
    if with_mask:
        print("  R+ target / distr. = share of the positive relevance on the half with the 0-3 digit / the "
              "distractor half", file=stream)
    if with_aopc and random_aopc is not None:
        patch, steps = _aopc_geometry(x)
        print(f"  AOPC = mean drop of f_c over the first {steps} steps of replacing {patch}x{patch} patches by "
              f"noise, most relevant first (random order: {random_aopc:.2f}); higher is better", file=stream)


# -- explain --------------------------------------------------------------------------------------------
def explain_command(args):
    import relprop
    from . import viz

    net, patterns, meta, _ = _load_model(args.model)
    if args.patterns:
        patterns = relprop.load_patterns(args.patterns, net)
    x = np.load(args.input, allow_pickle=False)
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


# -- entry point ------------------------------------------------------------------------------------------
def _parser():
    p = argparse.ArgumentParser(prog="relprop", description="Explain neural-network decisions (LRP, DTD, PatternNet, ...).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="explain a zoo net's samples with ten methods: a PNG grid and a table")
    d.add_argument("--model", default="detector", help="zoo net name or path (default: detector)")
    d.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated method names")
    d.add_argument("--backend", default=None, choices=["reference", "cpu", "cuda"])
    d.add_argument("--out", default=None, help="output folder or .png file (default: the current folder)")
    d.add_argument("--rows", type=int, default=4, help="samples shown in the figure (default: 4)")
    d.add_argument("--no-aopc", action="store_true", help="skip the perturbation (AOPC) column")
    d.add_argument("--no-quality", action="store_true", help="skip PatternNet's rho(S) table")

    e = sub.add_parser("explain", help="explain inputs from a .npy file with one method")
    e.add_argument("--model", required=True, help="a zoo net name or a .npz written by net.save")
    e.add_argument("--input", required=True, help=".npy file: one input or a batch in the net's layout")
    e.add_argument("--method", required=True, help="a method name (relprop.known_methods())")
    e.add_argument("--out", required=True, help="where to write the relevance (.npy)")
    e.add_argument("--png", default=None, help="also write the heatmap(s) as PNG")
    e.add_argument("--target", type=int, default=None, help="the class to explain (default: the argmax)")
    e.add_argument("--backend", default=None, choices=["reference", "cpu", "cuda"])
    e.add_argument("--patterns", default=None, help="patterns file for pattern.* methods (Patterns.save)")
    e.add_argument("--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                   help="a method option, e.g. --option epsilon=0.1 (repeatable)")

    sub.add_parser("methods", help="list the registered methods")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "demo":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        demo(args.model, methods, out=args.out, backend=args.backend, rows=args.rows, aopc=not args.no_aopc,
             quality=not args.no_quality)
        return 0
    if args.command == "explain":
        return explain_command(args)
    import relprop

    print("\n".join(relprop.known_methods()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
