"""`experiments/layerwise_resnet20.py --dither D`: the per-layer band against subtractive-dither
quantizations of the same layer through the real network (level 3N, one layer at a time)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")

from _scripts import load_script  # noqa: E402


def _script():
    return load_script("layerwise_resnet20")


def test_dither_replications_are_counted_against_the_band(real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTORTION_DATA", str(real_data))
    out = tmp_path / "out"
    argv = ["--n", "40", "--bits", "3", "--hessian-n", "0", "--realizations", "10",
            "--dither", "2", "--quiet", "--cache-dir", str(tmp_path / "c"),
            "--out", str(out)]  # fmt: skip
    assert _script().main(argv) == 0
    table = pd.read_csv(out / "table.csv")
    dith = pd.read_csv(out / "dither.csv")
    assert len(table) == 20 and len(dith) == 40  # 20 layers, 2 draws each
    assert table["hawq_omega"].isna().all()  # no Hessian trace asked for
    # each draw's verdict is its flip rate against that layer's band; the table's share and the
    # summary's pooled share are the means of those verdicts
    merged = dith.merge(table[["layer", "ours_flip_low", "ours_flip_high"]], on="layer")
    want = (merged.ours_flip_low <= merged.flip) & (merged.flip <= merged.ours_flip_high)
    assert (want == merged.in_band).all()
    per_layer = dith.groupby("layer", sort=False).in_band.mean()
    np.testing.assert_allclose(table.set_index("layer").loc[per_layer.index, "dither_in_band"],
                               per_layer.to_numpy())  # fmt: skip
    summary = pd.read_csv(out / "spearman.csv").set_index("set")
    assert summary.loc["3 bits", "dither_replications"] == 40
    assert summary.loc["3 bits", "dither_in_band"] == pytest.approx(dith.in_band.mean())
    # the draws differ from each other and from the rounding (dither is not nearest rounding)
    assert dith.groupby("layer").flip.nunique().max() > 1
    with pytest.raises(SystemExit):
        _script().main(["--dither", "-1"])


def test_rectifier_shift_columns(real_data, tmp_path, monkeypatch):
    """--rectifier adds the prediction with the mean shift of the rectifier after each layer
    (eq. L27-L28): the same as ours where no rectifier follows (the last linear layer), the
    verdicts of the draws against its own band; --skip takes held-out images."""
    monkeypatch.setenv("DISTORTION_DATA", str(real_data))
    out = tmp_path / "out"
    argv = ["--n", "30", "--skip", "100", "--bits", "3", "--hessian-n", "0",
            "--realizations", "40", "--dither", "1", "--rectifier", "--quiet",
            "--cache-dir", str(tmp_path / "c"), "--out", str(out)]  # fmt: skip
    assert _script().main(argv) == 0
    table = pd.read_csv(out / "table.csv").set_index("layer")
    dith = pd.read_csv(out / "dither.csv")
    lin = table.loc["linear"]
    assert lin.rect_flip == lin.ours_flip and lin.rect_flip_high == lin.ours_flip_high
    convs = table.drop(index="linear")
    assert (convs.rect_flip != convs.ours_flip).any()  # the shift moves the prediction
    assert (convs.rect_flip_low <= convs.rect_flip_high).all()
    merged = dith.merge(table[["rect_flip_low", "rect_flip_high"]].reset_index(), on="layer")
    want = (merged.rect_flip_low <= merged.flip) & (merged.flip <= merged.rect_flip_high)
    assert (want == merged.in_band_rect).all()
    summary = pd.read_csv(out / "spearman.csv").set_index("set")
    assert summary.loc["3 bits", "dither_in_band_rect"] == pytest.approx(dith.in_band_rect.mean())
    assert (out / "measured-resnet20-n30-skip100.npz").is_file()
    with pytest.raises(SystemExit):
        _script().main(["--skip", "-1"])
