"""``distortion predict``: the predicted accuracy loss of a quantized network, per bit-width.

Example::

    distortion predict --model resnet20 --data ../shared/data/cifar10/test.npz --bits 2-8
    distortion predict --model resnet56 --layers last --n 5000 --granularity channel
    distortion predict --model resnet20 --n 2000 --avg-bits 4   # also a mixed allocation
    distortion predict --model resnet20 --n 2000 --split evaluate --granularity channel \
        --bits 4,8 --activation-bits 8 --split-json split.json --split-figure split.pdf

Prints one row per bit-width: the expected flip rate and accuracy loss with the band of one
realization of the quantization error, and the level that produced them ("3": last layer,
empirical features, uniform error; "3L": several layers, first-order propagation). The
per-sample gradients behind "3L" are cached on disk (``--cache-dir``), so a second call is
fast. With ``--activation-bits`` the input of every quantized layer is quantized too (W+A,
``theory/activations.md``): calibrated on images the prediction does not use (the fit part of
``--split evaluate``, else the ``--calibration`` images after the N used), and the table is
followed by the weight / activation split of the largest bit-width (which layer, and is it the
weights or the activations), also written as JSON and a figure on request.
Light module: torch is imported inside :func:`run`.
"""

from __future__ import annotations

import argparse
import sys

from distortion.commands._common import (
    add_model_args,
    add_runtime_args,
    add_subset_args,
    load_model_and_dataset,
    parse_bits,
    progress_enabled,
)

__all__ = ["add_parser", "parse_bits", "run"]


def _bits_arg(text: str) -> list[int]:
    try:
        return parse_bits(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "predict",
        help="predict the accuracy loss of a quantized network, per bit-width",
        description=(
            "Predict the flip rate and accuracy loss of a network whose weights are quantized "
            "(last layer, or all convolution and linear layers), per bit-width, with the band "
            "of one realization of the quantization error."
        ),
    )
    add_model_args(p)
    p.add_argument("--bits", default="2-8", type=_bits_arg, help="bit-widths, e.g. 2-8 or 2,4,8")
    p.add_argument(
        "--layers",
        default="all",
        help="'last', 'all', or comma-separated layer names (default all)",
    )
    add_subset_args(p, n_default=1000, per_class=False, classes=False)
    p.add_argument(
        "--offset",
        type=int,
        default=0,
        metavar="K",
        help="skip the first K images: use images K..K+N-1 (default 0)",
    )
    p.add_argument(
        "--split",
        choices=("fit", "evaluate"),
        help=(
            "use one part of the seeded stratified split of the first N images that "
            "`distortion run` uses (fit: the statistics are fitted on it; evaluate: measured "
            "on it), with --fit-fraction and --seed; default: all N images"
        ),
    )
    p.add_argument(
        "--fit-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="share of each class in the fit part of --split (default 0.5, as data.fit_fraction)",
    )
    p.add_argument("--scheme", choices=("symmetric", "asymmetric"), default="symmetric")
    p.add_argument("--granularity", choices=("tensor", "channel"), default="tensor")
    p.add_argument("--clipping", choices=("max", "mse"), default="max")
    p.add_argument("--rounding", choices=("nearest", "stochastic", "dither"), default="nearest")
    p.add_argument(
        "--method",
        choices=("radial", "independent", "union"),
        default="radial",
        help="orthant probability of the correlated margins (default radial)",
    )
    p.add_argument(
        "--avg-bits",
        type=float,
        metavar="B",
        help="also print a mixed-precision allocation with at most B bits per weight",
    )
    p.add_argument(
        "--realizations",
        type=int,
        default=40,
        help=f"realizations behind the 95 %% band: 0 (no band) or >= {MIN_REALIZATIONS}",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the realizations and --split")
    a = p.add_argument_group("activations (W+A)")
    a.add_argument("--activation-bits", type=int, metavar="A",
                   help="also quantize the input of every quantized layer at A bits (2..16)")
    a.add_argument("--activation-granularity", choices=("tensor", "channel"), default="tensor")
    a.add_argument("--activation-calibration", choices=("minmax", "percentile", "mse"),
                   default="minmax", help="range of the activation grids (default minmax)")
    a.add_argument("--calibration", type=int, default=500, metavar="M",
                   help="calibration images of the activation grids (default 500)")
    a.add_argument("--split-json", metavar="FILE", help="write the W+A split as JSON")
    a.add_argument("--split-figure", metavar="FILE", help="draw the W+A split (pdf, png)")
    add_runtime_args(p, no_cache=False)
    return p


#: Fewest realizations behind a 95 % band (its 2.5 % and 97.5 % quantiles distinct).
MIN_REALIZATIONS = 39


def _loading_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--n`` raised by ``--offset``: load the images the selection needs."""
    loading = argparse.Namespace(**vars(args))
    if args.offset and args.n is not None:
        loading.n = args.offset + args.n
    if getattr(args, "activation_bits", None) and args.split is None and loading.n is not None:
        loading.n += args.calibration  # the calibration images follow the N used
    return loading


def calibration_images(dataset, args: argparse.Namespace):
    """The images the activation grids are calibrated on, never among those predicted:
    the first ``--calibration`` of the fit part of ``--split evaluate``, else the
    ``--calibration`` images after the first ``offset + n``."""
    import numpy as np

    from distortion.experiments.pipeline import fit_evaluate_mask, select_images

    if args.split == "evaluate":
        fit = fit_evaluate_mask(dataset.labels, dataset.n_classes, args.fit_fraction, args.seed)
        pos = np.flatnonzero(fit)[: args.calibration]
    else:  # (run() has refused --split fit and a missing --n)
        start = args.offset + args.n
        pos = np.arange(start, min(start + args.calibration, len(dataset)))
        if pos.size == 0:
            raise ValueError(
                f"no calibration images after the first {start}: the dataset has "
                f"{len(dataset)}; lower --n or pass --split evaluate"
            )
    return select_images(dataset, pos, f"calibration:{pos.size}")


def choose_images(dataset, args: argparse.Namespace):
    """The images ``predict`` fits on: ``dataset`` (the first ``offset + n`` images) without
    its first ``--offset`` ones, or the ``--split`` part of the run's seeded stratified split.

    Returns the dataset and a note for the printed header ("" when all images are used).
    """
    import numpy as np

    from distortion.experiments.pipeline import fit_evaluate_mask, select_images

    if args.split is not None:
        fit = fit_evaluate_mask(dataset.labels, dataset.n_classes, args.fit_fraction, args.seed)
        mask = fit if args.split == "fit" else ~fit
        note = (
            f", the {args.split} part of the first {len(dataset)} "
            f"(fit fraction {args.fit_fraction}, seed {args.seed})"
        )
        return select_images(dataset, np.flatnonzero(mask), args.split), note
    if args.offset:
        if args.offset >= len(dataset):
            raise ValueError(
                f"--offset {args.offset} skips every image: the dataset has {len(dataset)}"
            )
        pos = np.arange(args.offset, len(dataset))
        label = f"{args.offset}:{len(dataset)}"
        return select_images(dataset, pos, label), f", from image {args.offset}"
    return dataset, ""


def run(args: argparse.Namespace) -> int:
    """Fit the estimator, print the table; raises ValueError / FileNotFoundError."""
    import pandas as pd

    from distortion.estimator import AccuracyLossEstimator
    from distortion.quantize import UniformQuantizer

    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be a positive integer, got {args.n}")
    if args.offset < 0:
        raise ValueError(f"--offset must be >= 0, got {args.offset}")
    if args.split is not None and args.offset:
        raise ValueError("--split takes the run's split of the first N images: drop --offset")
    if not 0.0 < args.fit_fraction < 1.0:
        raise ValueError(f"--fit-fraction must be in (0, 1), got {args.fit_fraction}")
    if args.realizations != 0 and args.realizations < MIN_REALIZATIONS:
        raise ValueError(
            f"--realizations {args.realizations} is too few for a 95 % band (it needs at least "
            f"{MIN_REALIZATIONS}, so that its 2.5 % and 97.5 % quantiles are distinct draws); "
            "pass --realizations 40 or more, or 0 for no band"
        )
    layers = args.layers if args.layers in ("all", "last") else args.layers.split(",")
    quantizer = UniformQuantizer(
        max(args.bits),
        scheme=args.scheme,
        granularity=args.granularity,
        clipping=args.clipping,
        rounding=args.rounding,
    )
    if args.activation_bits is not None:
        if args.layers == "last":
            raise ValueError("--activation-bits needs the all-layer model: drop --layers last")
        if not 2 <= args.activation_bits <= 16:
            raise ValueError(f"--activation-bits must be in 2..16, got {args.activation_bits}")
        if args.calibration < 1:
            raise ValueError(f"--calibration must be a positive integer, got {args.calibration}")
        if args.split == "fit":  # before any work: the fit part is the calibration's
            raise ValueError(
                "--activation-bits calibrates on the fit part: predict on --split evaluate"
            )
        if args.split is None and args.n is None:
            raise ValueError(
                "--activation-bits needs calibration images the prediction does not use: pass "
                "--n (the calibration images follow them) or --split evaluate"
            )
    elif args.split_json or args.split_figure:
        raise ValueError("--split-json / --split-figure need --activation-bits")
    _, full, model = load_model_and_dataset(_loading_args(args))
    dataset, chosen = choose_images(full, args)
    if args.activation_bits is not None and args.split is None and args.n is not None:
        import numpy as np

        from distortion.experiments.pipeline import select_images

        stop = args.offset + args.n  # the calibration images after them are not predicted
        dataset = select_images(full, np.arange(args.offset, stop), f"{args.offset}:{stop}")
    est = AccuracyLossEstimator(
        quantizer,
        layers=layers,
        method=args.method,
        n_realizations=args.realizations,
        seed=args.seed,
        cache_dir=args.cache_dir,
        device=args.device,
        progress=progress_enabled(args),
    ).fit_model(model, dataset)
    acts = None
    if args.activation_bits is not None:
        from distortion.activations import ActivationQuantizer
        from distortion.experiments.activation_grams import activation_grams, check_disjoint
        from distortion.experiments.activations import calibrate_activations

        cal = calibration_images(full, args)
        check_disjoint(cal, dataset)
        aq = ActivationQuantizer(args.activation_bits, granularity=args.activation_granularity,
                                 calibration=args.activation_calibration)  # fmt: skip
        grids = calibrate_activations(model, cal, list(est.layers_), aq, n_images=len(cal),
                                      seed=args.seed)  # fmt: skip
        name = f"A{args.activation_bits} {args.activation_granularity}"
        acts = activation_grams(model, dataset, {name: grids}, cache_dir=args.cache_dir,
                                progress=progress_enabled(args))[name]  # fmt: skip
    pred = est.predict(args.bits, activations=acts)
    frame = pred.to_frame()
    cols = ["bits", "flip_rate", "flip_rate_low", "flip_rate_high", "accuracy_loss",
            "accuracy_loss_low", "accuracy_loss_high", "hu_fail_share", "level"]  # fmt: skip
    out = frame[cols].copy()
    for c in cols[1:-1]:
        out[c] = 100 * out[c]
    out.columns = ["bits", "flip %", "flip lo %", "flip hi %", "loss %", "loss lo %",
                   "loss hi %", "H_U fails %", "level"]  # fmt: skip
    print(
        f"{args.model} on {dataset.dataset_id} ({len(dataset)} images{chosen}), "
        f"{len(est.layers_)} layer(s), {args.scheme}/{args.granularity}/{args.clipping}/"
        f"{args.rounding}"
        + (
            ""
            if acts is None
            else f", activations A{args.activation_bits} per {args.activation_granularity} "
            f"({args.activation_calibration})"
        )
        + f"; float top-1 {100 * pred.accuracy_float:.2f} %; "
        + (
            f"bands: {100 * est.coverage:.0f} % for one realization"
            if args.realizations
            else "no bands (--realizations 0)"
        ),
        file=sys.stdout,
    )
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print(out.to_string(index=False, float_format=lambda v: f"{v:.3f}"), file=sys.stdout)
    print(
        "H_U fails %: share of the quantized layers whose error's second moment is more than "
        "20 % off Delta^2/12; where it is large, do not trust the prediction.",
        file=sys.stdout,
    )
    if acts is not None:
        _print_split(est, acts, args, len(cal))
    if args.avg_bits is not None:
        alloc = est.allocate(avg_bits=args.avg_bits, bits=args.bits)
        print(
            f"\nallocation <= {args.avg_bits} bits/weight: {alloc.avg_bits():.3f} bits/weight, "
            f"predicted flip {100 * alloc.flip_rate:.3f} %, loss {100 * alloc.accuracy_loss:.3f} %",
            file=sys.stdout,
        )
        print(alloc.to_frame().to_string(index=False), file=sys.stdout)
    return 0


def _print_split(est, acts, args: argparse.Namespace, n_cal: int) -> None:
    """The weight / activation split at the largest bit-width: printed, and written on
    request (``--split-json``, ``--split-figure``)."""
    import json
    from pathlib import Path

    b = max(args.bits)
    split = est.weight_activation_split(b, acts)
    a = args.activation_bits
    print(
        f"\nW{b}A{a} ({args.activation_granularity}, {args.activation_calibration} on {n_cal} "
        f"calibration images): predicted flip {100 * split.flip_rate:.3f} % "
        f"[{100 * split.flip_low:.3f}, {100 * split.flip_high:.3f}]; weights alone "
        f"{100 * split.weights_flip_rate:.3f} %, activations alone "
        f"{100 * split.activations_flip_rate:.3f} %",
        file=sys.stdout,
    )
    top = split.parts.sort_values("flip_rate", ascending=False).head(10).copy()
    for c in ("flip_rate", "share", "noise_share"):
        top[c] = 100 * top[c]
    top.columns = [{"flip_rate": "flip alone %", "share": "share %",
                    "noise_share": "noise share %"}.get(c, c) for c in top.columns]  # fmt: skip
    print("the ten largest parts (each alone):", file=sys.stdout)
    print(top.to_string(index=False, float_format=lambda v: f"{v:.3f}"), file=sys.stdout)
    if args.split_json:
        Path(args.split_json).write_text(json.dumps(split.to_dict(), indent=1))
        print(f"split written to {args.split_json}", file=sys.stdout)
    if args.split_figure:
        import matplotlib

        matplotlib.use("agg", force=False)
        from distortion.plotting.activations import plot_weight_activation_split

        ax = plot_weight_activation_split(split)
        ax.figure.savefig(args.split_figure, bbox_inches="tight")
        print(f"figure written to {args.split_figure}", file=sys.stdout)
