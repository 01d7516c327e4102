"""One-time cost of the input-noise ratios (level 3I) against the Grams, and the prediction.

For one network (default ResNet-56, every layer) and N CIFAR-10 test images, in one run:

- the per-sample Grams (``gradient_grams``, per channel, cache off): one forward and K
  backward passes per batch;
- the input-noise ratios of eq. L26 (``input_noise``, cache off) on the first ``--noise-n``
  of those images: one forward-mode pass per layer and draw;
- the prediction from what is cached, 3L and 3I (``multilayer_distortion`` with and without
  the inflation of eq. L25, band included), median of ``--repeats`` runs, at 3 bits per
  tensor.

With ``--rectifier``, also the mean shift of the rectifier after each layer that has one
(eq. L27-L28, ``rectifier_weight_shift``, float32, one pass per layer at ``--bits``) and the
one-layer prediction with it from the cache (median over the layers). With ``--smoothed P``,
the moment-propagated mean of every layer at once (eq. L31, ``smoothed_shift``, P probes,
two re-estimates, float32, cache off) and the level-3S prediction with it from the cache.
With ``--dither R``, level 3N of the same allocation (``dithered_prediction``: R networks with
subtractive-dither errors of the real steps, run through the real network; its band is the
calibrated one at 2-3 bits, ``theory/multilayer.md`` section 17).
``--noise-n 0`` skips the ratios.

Prints the times, the ratio of the one-time costs to the Grams, and the load (``uptime``) before and
after. ``--bias-correction M`` does the same for the bias-corrected network (M calibration
images after the first N).

    python benchmarks/bench_input_noise.py --model resnet56 --n 500 --noise-n 200
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return "uptime unavailable"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--noise-n", type=int, default=200)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--bias-correction", type=int, default=0, metavar="M")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rectifier", action="store_true")
    ap.add_argument("--smoothed", type=int, default=0, metavar="P",
                    help="also the smoothed mean shift, P probes (level 3S)")  # fmt: skip
    ap.add_argument("--dither", type=int, default=0, metavar="R",
                    help="also level 3N, R dithered networks (R >= 39)")  # fmt: skip
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from distortion.experiments import _paths
    from distortion.experiments.bias_correction import input_means
    from distortion.experiments.compare import _first_images
    from distortion.experiments.curvature import rectified_layers, rectifier_weight_shift
    from distortion.experiments.data import load_dataset
    from distortion.experiments.input_noise import input_noise
    from distortion.experiments.models import get_layer, load_model
    from distortion.experiments.pipeline import select_images
    from distortion.experiments.sensitivity import gradient_grams
    from distortion.experiments.smoothed import smoothed_shift
    from distortion.quantize import UniformQuantizer
    from distortion.theory.multilayer import multilayer_distortion

    print("load before:", _uptime(), "| threads:", torch.get_num_threads())
    full = load_dataset(_paths.shared_dir() / "data" / "cifar10" / "test.npz")
    data = select_images(full, np.arange(a.n), f"first:{a.n}")
    model = load_model(a.model)
    means = None
    if a.bias_correction:
        cal = select_images(full, np.arange(a.n, a.n + a.bias_correction), "cal")
        means = input_means(model, cal, progress=False)
    t = time.perf_counter()
    grams = gradient_grams(model, data, granularity="channel", cache=False, progress=False,
                           input_means=means)  # fmt: skip
    t_grams = time.perf_counter() - t
    t = time.perf_counter()
    noise = None
    if a.noise_n:
        noise = input_noise(model, _first_images(data, a.noise_n),
                            layers=list(grams.layer_names), bias_correction=means, cache=False,
                            progress=False)  # fmt: skip
    t_noise = time.perf_counter() - t
    q = UniformQuantizer(a.bits)
    m2 = [
        q.compress(get_layer(model, n).weight.detach()).error_model.second_moment
        for n in grams.layer_names
    ]

    def timed(f) -> tuple[float, object]:
        ts, r = [], None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            r = f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), r

    t3l, r3l = timed(lambda: multilayer_distortion(grams, m2, band=True))
    n_layers = len(grams.layer_names)
    shifts, t_rect = {}, 0.0
    if a.rectifier:
        t = time.perf_counter()
        for name in rectified_layers(model):
            i = list(grams.layer_names).index(name)
            shifts[i] = rectifier_weight_shift(
                model, data, name, m2[i], dtype=torch.float32,
                input_mean=None if means is None else means.mean(name),
            )  # fmt: skip
        t_rect = time.perf_counter() - t
    print(f"{a.model}: {n_layers} layers, {a.n} images (ratios on {a.noise_n}), "
          f"bias correction {a.bias_correction or 'off'}")  # fmt: skip
    print(f"Grams (1 forward + K backward per batch): {t_grams:.1f} s")
    if noise is not None:
        t3c, r3c = timed(lambda: multilayer_distortion(grams, noise.inflate(m2), band=True))
        print(f"input-noise ratios ({max(n_layers - 1, 1)} layers x {noise.n_draws} draws): "
              f"{t_noise:.1f} s  = {t_noise / t_grams:.2f} x the Grams")  # fmt: skip
        print(f"prediction from the cache, {a.bits} bits per tensor, median of {a.repeats}: "
              f"3L {1e3 * t3l:.1f} ms (flip {r3l.flip_rate:.4f}), "
              f"3I {1e3 * t3c:.1f} ms (flip {r3c.flip_rate:.4f})")  # fmt: skip
    if shifts:
        one = []
        for i, mu in shifts.items():  # one layer at a time, with its shift (eq. L28)
            v = [0.0] * n_layers
            v[i] = m2[i]
            one.append(timed(lambda v=v, mu=mu: multilayer_distortion(grams, v, band=True,
                                                                      shift=mu))[0])  # fmt: skip
        print(f"rectifier shifts ({len(shifts)} layers, {a.bits} bits, float32): {t_rect:.1f} s "
              f"= {t_rect / t_grams:.2f} x the Grams, {t_rect / len(shifts):.2f} s per layer; "
              f"one-layer prediction with its shift from the cache: median "
              f"{1e3 * statistics.median(one):.1f} ms")  # fmt: skip
    if a.smoothed:
        if means is not None:
            ap.error("--smoothed models the uncorrected network: drop --bias-correction")
        t = time.perf_counter()
        mu, changes = smoothed_shift(model, data, dict(zip(grams.layer_names, m2, strict=True)),
                                     n_probes=a.smoothed, cache=False)  # fmt: skip
        t_sm = time.perf_counter() - t
        t3s, r3s = timed(lambda: multilayer_distortion(grams, m2, band=True, shift=mu))
        print(f"smoothed mean shift (all layers, {a.smoothed} probes x 3 passes, {a.bits} bits "
              f"per tensor, float32): {t_sm:.1f} s = {t_sm / t_grams:.2f} x the Grams (last "
              f"re-estimate changed s by {100 * float(changes[:, -1].max()):.1f} % rms at most); "
              f"prediction from the cache, median of {a.repeats}: 3L {1e3 * t3l:.1f} ms (flip "
              f"{r3l.flip_rate:.4f}), 3S {1e3 * t3s:.1f} ms (flip "
              f"{r3s.flip_rate:.4f})")  # fmt: skip
    if a.dither:
        from distortion.experiments.compare import dithered_prediction

        t = time.perf_counter()
        r3n = dithered_prediction(
            model, data, q, layers=list(grams.layer_names), repeats=a.dither, progress=False,
            bias_correction=means,
        )  # fmt: skip
        t_3n = time.perf_counter() - t
        lo, hi = r3n.flip_rate_band
        print(f"level 3N ({a.dither} dithered networks, {a.bits} bits per tensor): {t_3n:.1f} s "
              f"= {t_3n / t_grams:.2f} x the Grams (flip {r3n.flip_rate:.4f}, band [{lo:.3f}, "
              f"{hi:.3f}])")  # fmt: skip
    print("load after:", _uptime())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
