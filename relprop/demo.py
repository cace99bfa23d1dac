"""``relprop demo``: real heatmaps of real trained nets, and the seeds' network-level views.

:func:`demo` explains a zoo net's held-out samples with ten methods, writes a grid of
heatmaps (PNG) and prints a table per method: time per image, the conservation error of
the relevance methods (:func:`relprop.metrics.conservation`), where the positive relevance
lies (for the ``detector``: on the half with the 0-3 digit or on the distractor), AOPC of
region perturbation, and PatternNet's signal-estimator quality ρ(S) per layer.
:data:`VIEWS` draws feature visualisation, activation maximisation, TCAV and LIME figures
(``relprop demo --show NAME``).  The command line itself is :mod:`relprop.cli`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["demo", "DEMO_METHODS", "VIEWS", "VIEW_MODELS", "demo_features", "demo_maximize", "demo_tcav",
           "demo_lime"]

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
    """(net, patterns or None, meta, samples dict) from a zoo name, a ``.npz`` path or an ``.onnx`` file."""
    from . import zoo

    if Path(spec).suffix.lower() == ".onnx" and Path(spec).is_file():
        from .io import from_onnx

        return from_onnx(spec), None, {"name": Path(spec).stem}, {"x": None, "y": None, "mask": None}
    if spec in zoo.NAMES or Path(spec).exists():
        m = zoo.load(spec)
        return m.net, m.patterns, m.meta, {"x": m.x, "y": m.y, "mask": m.masks}
    raise SystemExit(f"relprop: --model {spec!r} is neither a zoo net ({', '.join(zoo.NAMES)}) nor an existing "
                     "file (.npz or .onnx)")


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
    """Held-out inputs for ρ(S), from the distribution of the data the patterns were fitted on.

    The detector's patterns come from detection images of the training digits; ρ is measured
    on 2,048 fresh compositions of those digits (another seed).  Images of the test digits
    would not do: there are too few of them (359 digits) for the 784-dimensional input of
    layer 6, whose held-out rank collapses to 581 (780 on the training digits), and ρ of every
    estimator drops to ~0 there.  Without scikit-learn: the shipped samples (few; ρ is rough).
    """
    if model_name == "detector":
        try:
            from .nets import data

            return data.detection("train", 2048, seed=3)[0]
        except ImportError:
            pass
    return samples["x"]


def _rank_notes(q, ratio=0.9):
    """Warnings for layers whose held-out input rank is far below the number of varying input features."""
    return [f"layer {row['layer']}: the held-out inputs span rank {row['rank']} of {row['dim']} varying input "
            "features; rho there says little (draw held-out data from the pattern data's distribution)"
            for row in q.rows() if row["rank"] is not None and row["rank"] < ratio * row["dim"]]


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
            err = relprop.metrics.conservation(net, x, R, target=target, backend=backend)["absolute"]
            row["conservation"] = float(np.mean(np.abs(err) / np.maximum(np.abs(f_c), 1e-12)))
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
            held_out = _signal_quality_data(name, samples)
            q = signal_quality(net, patterns, held_out, backend=backend)
            print(f"\nPatternNet signal estimators, quality rho(S) per layer on {len(held_out)} held-out inputs "
                  "(higher is better; S_x leaves no distractor, so rho is undefined; random: a random "
                  "direction, the baseline):", file=stream)
            print(_indent(str(q)), file=stream)
            for note in _rank_notes(q):
                print(f"  warning: {note}", file=stream)

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


# -- demo views of the feature-level methods (--show features | maximize | tcav | lime) ---------------------
#: the zoo net each view uses when --model is not given
VIEW_MODELS = {"heatmaps": "detector", "features": "digits_cnn", "maximize": "digits_cnn", "tcav": "digits_cnn",
               "lime": "detector"}


def _view_png(out, name, view):
    path = _png_path(out, name)
    return path if Path(str(out or "")).suffix.lower() == ".png" else path.with_name(f"relprop_{view}_{name}.png")


def _view_data(name, samples):
    """A data set for the views: the digits (all 1797, 28x28) or fresh detection images; the zoo samples without
    scikit-learn."""
    try:
        from .nets import data

        if name == "detector":
            x, y, _ = data.detection("test", 1000, seed=5)
            return x, y
        if name == "digits_cnn":
            return data.digits("all", 28)
        if name == "digits_mlp":
            return data.digits("all", 8, flat=True)
    except ImportError:
        pass
    return samples["x"], samples["y"]


def _last_feature_map(net, shape):
    """The last ReLU (else any layer) whose output is a feature map of at least 4x4 positions."""
    shapes = net.shapes((1,) + tuple(shape))
    maps = [i for i, s in enumerate(shapes) if len(s) == 4 and min(s[2:]) >= 4]
    if not maps:
        raise SystemExit("relprop demo --show features: this net has no convolutional feature map")
    relus = [i for i in maps if net.layers[i].kind == "relu"]
    return (relus or maps)[-1]


def demo_features(model="digits_cnn", out=None, backend=None, channels=8, k=9, stream=None):
    """Zeiler & Fergus's figure for the last conv feature map: top-k activations, projections and patches."""
    from . import visualize

    stream = sys.stdout if stream is None else stream
    t0 = time.perf_counter()
    net, _, meta, samples = _load_model(model)
    name = meta.get("name", str(model))
    x, _ = _view_data(name, samples)
    layer = _last_feature_map(net, x.shape[1:])
    top = visualize.top_activations(net, x, layer, k=k, backend=backend)
    t_top = time.perf_counter() - t0
    rows = np.argsort(-top.values[:, 0], kind="stable")[:channels]  # the most strongly responding channels
    rows = np.sort(rows)
    size = visualize.receptive_field_size(net, layer, x.shape[1:])
    print(f"relprop demo --show features: {name}, layer {layer} ({net.layers[layer].kind}), "
          f"{len(top.channels)} channels, receptive field {size[0]}x{size[1]} px, top-{k} over {len(x)} inputs "
          f"in {t_top:.2f} s", file=stream)
    print(f"  {'channel':>8}{'top activation':>16}{'9th':>8}  samples", file=stream)
    for r in rows:
        print(f"  {int(top.channels[r]):>8}{top.values[r, 0]:>16.3f}{top.values[r, -1]:>8.3f}  "
              f"{' '.join(str(int(i)) for i in top.index[r])}", file=stream)
    png = _view_png(out, name, "features")
    visualize.feature_grid(net, x, top, rows=rows, path=png, backend=backend,
                           title=f"What the channels of layer {layer} of '{name}' respond to: their top {k} "
                                 f"activations over {len(x)} images",
                           footnote="left: each activation projected to pixel space by the DeconvNet (red +, blue −); "
                                    f"right: the input patch under the unit's {size[0]}×{size[1]} receptive field "
                                    "(grey: beyond the image border)")
    print(f"\nwrote {png}", file=stream)
    return png, top


def demo_maximize(model="digits_cnn", out=None, backend=None, steps=200, stream=None):
    """Activation maximisation of every class logit and of a few units of the last feature map."""
    from . import visualize

    stream = sys.stdout if stream is None else stream
    net, _, meta, samples = _load_model(model)
    name = meta.get("name", str(model))
    x, _ = _view_data(name, samples)
    shape = tuple(x.shape[1:])
    low, high = meta.get("input_range") or (float(x.min()), float(x.max()))
    classes = meta.get("classes") or list(range(net.shapes((1,) + shape)[-1][1]))
    t0 = time.perf_counter()
    opts = dict(steps=steps, lr=0.05, l2=0.01, clip=(low, high), seed=0, backend=backend)
    if len(shape) == 3:
        opts.update(jitter=1, blur_every=4, blur_sigma=0.6)
    res = visualize.maximize(net, list(range(len(classes))), shape, **opts)
    images, curves = [res.image], [res.activations]
    titles = [f"class {c}" for c in classes]
    logits = np.asarray(net.forward(x, backend=backend))
    print(f"relprop demo --show maximize: {name}, {steps} steps of gradient ascent, L2 decay "
          f"{opts['l2']}, clip to [{low:g}, {high:g}]"
          + (", jitter 1 px, blur every 4 steps" if len(shape) == 3 else ""),
          file=stream)
    print(f"  {'target':<18}{'synthesised':>12}{'best input':>12}", file=stream)
    for c in range(len(classes)):
        print(f"  {'logit ' + str(classes[c]):<18}{res.activations[c, -1]:>12.2f}{logits[:, c].max():>12.2f}",
              file=stream)
    if len(shape) == 3:
        layer = _last_feature_map(net, shape)
        conv = max(i for i in net.linear_layers() if i < layer)  # its pre-activation: a ReLU unit can start off
        h, w = net.shapes((1,) + shape)[conv][2:]
        pos = (h // 2, w // 2)
        pre = np.asarray(net.trace(x, backend=backend).layer_output(conv))
        unit_t = [_make_unit(conv, c, pos) for c in range(min(len(classes), pre.shape[1]))]
        ures = visualize.maximize(net, unit_t, shape, **opts)
        images.append(ures.image)
        curves.append(ures.activations)
        titles += [f"layer {conv} ch {u.channel}" for u in unit_t]
        for u in unit_t:
            print(f"  {f'layer {conv} ch {u.channel} @{pos}':<18}{ures.activations[u.channel, -1]:>12.2f}"
                  f"{pre[:, u.channel, pos[0], pos[1]].max():>12.2f}", file=stream)
    print(f"  (best input: the largest value over the {len(x)} inputs of the data set; "
          f"{time.perf_counter() - t0:.1f} s)", file=stream)
    png = _view_png(out, name, "maximize")
    from . import viz

    viz.maximize_figure(np.concatenate(images), np.concatenate(curves), titles=titles, path=png, cols=len(classes),
                        image_shape=tuple(meta["image_shape"]) if meta.get("image_shape") else None,
                        title=f"Inputs that maximise the class logits and units of '{name}' (Simonyan et al. 2013)",
                        footnote=f"gradient ascent from uniform noise, {steps} steps, L2 decay {opts['l2']}, "
                                 f"clipped to the input range [{low:g}, {high:g}]"
                                 + ("; jitter and Gaussian blur; units at the centre of their map"
                                    if len(shape) == 3 else "") + "; below: the activation at every step")
    print(f"\nwrote {png}", file=stream)
    return png, res


def _make_unit(layer, channel, position=None):
    from .engine import Unit

    return Unit(layer=layer, channel=channel, position=position)


def _strokes(kind, n, rng, size=28):
    """Synthetic concept images in the digits' look: soft strokes ~3 px wide inside the 24x24 centre."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((n, 1, size, size), dtype=np.float32)

    def segment(p, q):
        d = q - p
        t = np.clip(((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / max(d @ d, 1e-9), 0, 1)
        return np.hypot(yy - p[0] - t * d[0], xx - p[1] - t * d[1])

    for i in range(n):
        c = size / 2 + rng.uniform(-2.5, 2.5, 2)
        if kind == "ring":
            r = rng.uniform(5.5, 8.5), rng.uniform(4.5, 7.0)
            dist = np.abs(np.hypot((yy - c[0]) / r[0], (xx - c[1]) / r[1]) - 1) * min(r)
        elif kind == "vertical stroke":
            half = rng.uniform(7, 10)
            dx = rng.uniform(-1.5, 1.5)
            dist = segment(np.array([c[0] - half, c[1] + dx]), np.array([c[0] + half, c[1] - dx]))
        elif kind == "horizontal stroke":
            half = rng.uniform(5, 8)
            y = rng.uniform(6, 21)
            dist = segment(np.array([y, c[1] - half]), np.array([y + rng.uniform(-1, 1), c[1] + half]))
        else:
            raise ValueError(kind)
        out[i, 0] = gaussian_filter(np.clip(1.8 - dist / 1.2, 0, 1), 0.7)
    return np.clip(out, 0, 1)


TCAV_CONCEPTS = ("ring", "vertical stroke", "horizontal stroke")


def demo_tcav(model="digits_cnn", out=None, backend=None, classes=(0, 1, 7), n_random=12, stream=None):
    """TCAV of synthetic stroke concepts (ring, vertical, horizontal) for a few digit classes."""
    from . import concepts, viz

    stream = sys.stdout if stream is None else stream
    net, _, meta, samples = _load_model(model)
    name = meta.get("name", str(model))
    x, y = _view_data(name, samples)
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise SystemExit("relprop demo --show tcav: the stroke concepts are drawn for 1x28x28 digits (digits_cnn)")
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    concept_x = {k: _strokes(k, 40, rng) for k in TCAV_CONCEPTS}
    order = rng.permutation(len(x))
    random_sets = [x[order[i * 40:(i + 1) * 40]] for i in range(n_random)]  # random digits of any class
    layer = _last_feature_map(net, x.shape[1:])
    results = {}
    print(f"relprop demo --show tcav: {name}, layer {layer}, concepts drawn as strokes (40 images each) against "
          f"{n_random} random sets of 40 digits", file=stream)
    print(f"  {'class':<8}{'concept':<20}{'TCAV':>8}{'± std':>8}{'random':>9}{'p':>10}  CAV acc.", file=stream)
    for c in classes:
        cx = x[np.asarray(y) == c][:100]
        results[f"digit {c}"] = {}
        for k in TCAV_CONCEPTS:
            r = concepts.tcav(net, layer, cx, c, concept_x[k], random_sets, seed=0, backend=backend)
            results[f"digit {c}"][k] = r
            print(f"  {c:<8}{k:<20}{r.mean:>8.2f}{r.std:>8.2f}{r.random_mean:>9.2f}{r.p_value:>10.1e}  "
                  f"{np.nanmean(r.accuracies):.2f}", file=stream)
    print(f"  ({time.perf_counter() - t0:.1f} s)", file=stream)
    png = _view_png(out, name, "tcav")
    viz.tcav_figure(results, path=png, examples=concept_x,
                    title=f"TCAV: which drawn strokes matter to the digit classes of '{name}' (layer {layer})",
                    footnote="bars: mean TCAV score ± std over CAVs against 12 random digit sets; grey: random "
                             "concepts; * differs from random (two-sided t-test, p < 0.05), n.s. does not")
    print(f"\nwrote {png}", file=stream)
    return png, results


def demo_lime(model="detector", out=None, backend=None, rows=4, samples=1000, stream=None):
    """LIME on SLIC superpixels beside a relevance heatmap, on a zoo net's samples."""
    import relprop
    from . import viz

    stream = sys.stdout if stream is None else stream
    net, patterns, meta, smp = _load_model(model)
    name = meta.get("name", str(model))
    x, y, mask = smp["x"], smp["y"], smp["mask"]
    if x.ndim != 4:
        raise SystemExit("relprop demo --show lime: the superpixel view needs image inputs (N, C, H, W)")
    picked = _pick_rows(y, mask, min(rows, len(x)))
    xs = x[picked]
    target = np.argmax(net.forward(xs, backend=backend), axis=1)
    explainer = relprop.Explainer(net, "lime", backend=backend, samples=samples, n_segments=40, seed=0)
    t0 = time.perf_counter()
    fit = explainer._method.fit(xs, target, backend or "cpu")
    per_image = (time.perf_counter() - t0) / len(xs)
    net.forward(xs[:1], backend=backend)
    t1 = time.perf_counter()
    for _ in range(3):
        net.forward(np.repeat(xs[:1], 64, axis=0), backend=backend)
    fwd = (time.perf_counter() - t1) / 3
    lrp = relprop.explain(net, xs, "lrp.epsilon_plus_flat", target=target, backend=backend)
    others = {"LRP ε + z⁺ + flat": np.asarray(lrp)}
    classes = meta.get("classes")
    labels = [f"class {classes[t] if classes else t}" for t in target]
    print(f"relprop demo --show lime: {name}, {samples} perturbations per image, SLIC superpixels", file=stream)
    print(f"  {'sample':>6}{'class':>7}{'segments':>10}{'R² (weighted)':>15}", file=stream)
    for i, n in enumerate(picked):
        print(f"  {n:>6}{int(target[i]):>7}{len(fit.coef[i]):>10}{fit.score[i]:>15.3f}", file=stream)
    if mask is not None:
        pos = np.maximum(fit.heatmap(), 0)
        inside = [float(np.sum(pos[i] * mask[n]) / max(np.sum(pos[i]), 1e-12)) for i, n in enumerate(picked)]
        print(f"  share of the positive LIME weight on the half with the 0-3 digit: {np.mean(inside):.0%}", file=stream)
    print(f"  {per_image:.2f} s per image = {per_image / fwd:.1f} forward passes of a batch of 64", file=stream)
    png = _view_png(out, name, "lime")
    viz.lime_figure(xs, fit, path=png, row_titles=labels, others=others,
                    title=f"LIME on '{name}': a linear surrogate on superpixels (Ribeiro et al. 2016)",
                    footnote=f"{samples} perturbations per image switch superpixels off to 0; red: the segment raises "
                             "the class logit, blue: lowers it; right: LRP for comparison")
    print(f"\nwrote {png}", file=stream)
    return png, fit


VIEWS = {"features": demo_features, "maximize": demo_maximize, "tcav": demo_tcav, "lime": demo_lime}



# -- explain --------------------------------------------------------------------------------------------
