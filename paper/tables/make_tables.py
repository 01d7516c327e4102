"""Generate the LaTeX tables (booktabs ``tabular`` bodies) and the numbers quoted in the text.

Reads ``<results>/comparison.csv``, ``<results>/hypotheses/<model>/``, ``<results>/run.json``
and the two-class simulation table; writes into ``<out>/tables/``:

- ``summary.tex``: mean absolute error of each level and of Sakr's bound per model x problem
  x layer set x granularity x bit range (below 4 bits and from 4 on), and the level-3 band
  coverage;
- ``cells.tex`` / ``cells_all.tex``: flip rate per bit-width of the first model, first
  problem and granularity, last layer / all layers;
- ``hypotheses_gaussian.tex``, ``hypotheses_uniform.tex``: verdicts of the H_G and H_U tests;
- ``simulation.tex``: agreement of the two-class closed forms with the Monte Carlo;
- ``compression.tex``: per model x compression family (pruning, low rank, codebooks,
  non-uniform grids, compositions), the 3L band coverage, the mean |error| of 2L and 3L, the
  noise check and where each part of the model breaks (``compression_summary.csv``);
- ``numbers.tex``: ``\\res{key}`` values quoted in the text (``\\res`` is defined in main.tex);
- ``incomplete.tex``: empty when the results folder is complete, else a box naming the
  missing inputs and the commands that produce them (``figures/_inputs.py``), printed at the
  top of the PDF.

Each table is a bare ``tabular``: captions and floats are in ``main.tex``. An input that is
missing (e.g. no hypothesis tests in a small run) gives a table saying so, and is listed in
``incomplete.tex``; ``make -C paper`` refuses such a folder unless ``ALLOW_INCOMPLETE=1``.
Usage: ``python paper/tables/make_tables.py [--results DIR] [--out DIR]``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "figures"))
import _paths  # noqa: E402

__all__ = ["make"]

PP = 100.0  # fractions -> percent / percentage points
SPLIT_BITS = 4  # summaries report bit-widths below this and from it on separately
NA = "--"  # a value that does not apply or is missing: an en dash in every table


def level_prefix(level: int, layers: str) -> str:
    """Column prefix of a level: L1-L3 for the last layer, L2L / L3L for all layers."""
    return f"L{level}L" if layers == "all" and level in (2, 3) else f"L{level}"


def _value(row: Any, col: str) -> float:
    """``row[col]`` as a float; NaN when the column is absent or not a number."""
    try:
        return float(row[col]) if col in row else math.nan
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- formatting
def tex_escape(text: Any) -> str:
    """Escape LaTeX's special characters in a label."""
    s = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                 ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\~{}"),
                 ("^", r"\^{}")):  # fmt: skip
        s = s.replace(a, b)
    return s


def text(value: Any) -> str:
    """A label for a table cell: a missing value (None, NaN) as :data:`NA`, never "nan"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NA
    try:
        import pandas as pd

        if pd.isna(value):
            return NA
    except (TypeError, ValueError):
        pass
    return tex_escape(value)


def fmt(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` significant-looking decimals; NaN or None as :data:`NA`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return text(value)
    if not math.isfinite(v):
        return NA
    if v == 0:
        return "0"
    tiny = 0.5 * 10.0 ** (-digits)
    if abs(v) < tiny:  # would print as 0.00: say how small instead
        return rf"{'$-$' if v < 0 else ''}$<${10.0 ** (-digits):.{digits}f}"
    return f"{v:.{digits}f}".replace("-", "$-$")


def pretty_model(name: str) -> str:
    import re

    m = re.fullmatch(r"resnet(\d+)", str(name))
    return f"ResNet-{m.group(1)}" if m else tex_escape(name)


def tabular(
    header: Sequence[str] | Sequence[Sequence[str]],
    rows: Sequence[Sequence[str]],
    align: str,
    *,
    rules_after: Sequence[int] = (),
    header_rules: Sequence[str] = (),
) -> str:
    """A booktabs tabular. ``header`` is one row or several; ``rules_after`` are row indices
    followed by a ``\\midrule``; ``header_rules`` are ``\\cmidrule`` specs after the first
    header row (e.g. ``"(lr){2-4}"``)."""
    heads = [header] if header and isinstance(header[0], str) else list(header)
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    for i, h in enumerate(heads):
        lines.append(" & ".join(h) + r" \\")
        if i == 0 and header_rules:
            lines.append(" ".join(rf"\cmidrule{spec}" for spec in header_rules))
    lines.append(r"\midrule")
    for i, r in enumerate(rows):
        lines.append(" & ".join(r) + r" \\")
        if i in rules_after and i < len(rows) - 1:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def placeholder(what: str, path: Path) -> str:
    """A one-cell table saying what input was missing."""
    return tabular(["(not available)"], [[rf"no {tex_escape(what)}: {tex_escape(path.name)}"]], "l")


def _write(out: Path, name: str, text: str) -> Path:
    path = out / f"{name}.tex"
    path.write_text(f"% generated by paper/tables/make_tables.py -- do not edit\n{text}")
    return path


# --------------------------------------------------------------------------- the tables
def summary_table(t: Any, split_bits: int = SPLIT_BITS) -> str:
    """Per model x problem x layers x granularity x bit range (below ``split_bits`` and from
    it on): cells, mean |error| (pp), band coverage. One range must not hide the other: the
    first-order models are meant for the upper one."""
    from distortion.experiments.compare import Comparison

    agg = Comparison(t).summary(split_bits=split_bits)
    rows, prev = [], None
    rules = []
    for i, r in agg.iterrows():
        if prev is not None and r["model"] != prev:
            rules.append(i - 1)
        prev = r["model"]
        lay = str(r["layers"])
        # the level-1 column does not apply to all layers (L1_* is NaN there): NA like the rest
        flip = [f"{level_prefix(lv, lay)}_flip_rate_abs_error" for lv in (1, 2, 3)]
        loss = f"{level_prefix(3, lay)}_accuracy_loss_abs_error"
        cols = [*flip, "sakr_flip_rate_abs_error", loss]
        # the band of the layer set's level 3 (L3 or L3L)
        band = _value(r, "band_coverage")
        if "bits_min" in r:
            lo, hi = int(r["bits_min"]), int(r["bits_max"])
            bits = f"{lo}" if lo == hi else f"{lo}--{hi}"
        else:
            bits = str(r["bits"]).replace("-", "--")
        rows.append([
            pretty_model(r["model"]), text(r["problem"]), text(r["layers"]),
            text(r["granularity"]), bits, str(int(r["cells"])),
            *[fmt(PP * _value(r, c)) for c in cols],
            f"{PP * band:.0f}" if math.isfinite(band) else NA,
        ])  # fmt: skip
    header = [
        ["", "", "", "", "", "", r"\multicolumn{4}{c}{mean $|$error$|$ of the flip rate (pp)}",
         r"loss (pp)", r"in band"],
        ["model", "problem", "layers", "step", "bits", "cells", "L1", "L2/L2L", "L3/L3L", "Sakr",
         "L3/L3L", r"(\%)"],
    ]  # fmt: skip
    return tabular(header, rows, "lllllrrrrrrr", rules_after=rules, header_rules=["(lr){7-10}"])


def _select_cell(t: Any, layers: str) -> Any:
    s = t[t["layers"] == layers]
    if s.empty:
        return s
    first = s.iloc[0]
    return s[
        (s["model"] == first["model"])
        & (s["problem"] == first["problem"])
        & (s["granularity"] == first["granularity"])
    ].sort_values("bits")


def cells_table(t: Any, layers: str) -> tuple[str, str]:
    """Flip rate (%) per bit-width of one series; returns (tabular, description)."""
    s = _select_cell(t, layers)
    if s.empty:
        return tabular(["(not available)"], [[f"no {layers}-layer rows"]], "l"), ""
    first = s.iloc[0]
    where = "last layer" if layers == "last" else "all layers"
    desc = (
        f"{pretty_model(first['model'])}, {tex_escape(first['problem'])}, {where}, "
        f"per-{tex_escape(first['granularity'])} steps"
    )
    pre = {lv: level_prefix(lv, layers) for lv in (1, 2, 3)}
    levels = [lv for lv in (1, 2, 3) if s.get(f"{pre[lv]}_flip_rate") is not None
              and s[f"{pre[lv]}_flip_rate"].notna().any()]  # fmt: skip
    rows = []
    for _, r in s.iterrows():
        lo = fmt(PP * _value(r, "measured_flip_rate_low"))
        hi = fmt(PP * _value(r, "measured_flip_rate_high"))
        meas = f"{fmt(PP * _value(r, 'measured_flip_rate'))} [{lo}, {hi}]"
        row = [str(int(r["bits"])), meas]
        for lv in levels:
            p = pre[lv]
            cell = fmt(PP * _value(r, f"{p}_flip_rate"))
            if lv == 3 and f"{p}_flip_rate_low" in r:
                band_lo, band_hi = _value(r, f"{p}_flip_rate_low"), _value(r, f"{p}_flip_rate_high")
                cell += rf" [{fmt(PP * band_lo)}, {fmt(PP * band_hi)}]"
            row.append(cell)
        raw = _value(r, "sakr_flip_rate_bound_raw")
        if not math.isfinite(raw):
            raw = _value(r, "sakr_flip_rate_bound")
        row.append(r"$>$100" if raw > 1 else fmt(PP * raw))
        rows.append(row)
    header = ["bits", r"measured [95\% CI]",
              *[pre[lv] + (r" [band]" if lv == 3 else "") for lv in levels], "Sakr"]  # fmt: skip
    return tabular(header, rows, "r" + "r" * (len(header) - 1)), desc


def hypotheses_gaussian_table(reports: dict[str, Any]) -> str:
    """Verdict counts and median effect sizes of H_G, per model and kind."""
    rows = []
    for model, rep in reports.items():
        s = rep.gaussian_summary()
        for _, r in s.iterrows():
            rows.append([
                pretty_model(model), text(r["kind"]), str(int(r["n_variables"])),
                str(int(r["holds"])), str(int(r["marginal"])), str(int(r["fails"])),
                fmt(r["median_abs_skewness"]), fmt(r["median_abs_excess_kurtosis"]),
                fmt(r["median_wasserstein"], 3),
            ])  # fmt: skip
    header = ["model", "variables", "count", "holds", "marginal", "fails", r"med.\ $|G_1|$",
              r"med.\ $|G_2|$", r"med.\ $W_1$"]  # fmt: skip
    return tabular(header, rows, "llrrrrrrr", rules_after=list(range(1, len(rows), 2)))


def hypotheses_uniform_table(reports: dict[str, Any]) -> str:
    """Per bit-width: the H_U verdict of the last layer and the layer counts, per model and
    quantizer."""
    import pandas as pd

    blocks = {}
    for model, rep in reports.items():
        s = rep.uniform_summary()
        for q, scope in s.columns:
            if scope in ("last layer", "layers h/m/f"):
                blocks[(model, q, scope)] = s[(q, scope)]
    if not blocks:
        return tabular(["(not available)"], [["no H_U rows"]], "l")
    frame = pd.DataFrame(blocks)
    pairs = list(dict.fromkeys((m, q) for m, q, _ in frame.columns))
    head1 = [""]
    for m, q in pairs:
        label = f"{pretty_model(m)}, {tex_escape(q.replace('_', ' '))}"
        head1.append(rf"\multicolumn{{2}}{{c}}{{{label}}}")
    head2 = ["bits", *["last", "h/m/f"] * len(pairs)]
    rules = [f"(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(pairs))]
    rows = []
    for b, r in frame.iterrows():
        row = [str(int(b))]
        for m, q in pairs:
            row.append(text(r.get((m, q, "last layer"))))
            row.append(text(r.get((m, q, "layers h/m/f"))))
        rows.append(row)
    return tabular([head1, head2], rows, "r" + "lc" * len(pairs), header_rules=rules)


def simulation_table(sim: Any) -> str:
    """Agreement of the closed forms with the Monte Carlo per bit-width."""
    rows = []
    for b, g in sim.groupby("bits"):
        n = len(g)
        rows.append([
            str(int(b)), str(n),
            f"{int(g['ok_taylor'].sum())}", fmt(PP * g["rel_taylor"].abs().median(), 1),
            f"{int(g['ok_moment'].sum())}", fmt(PP * g["rel_moment"].abs().median(), 1),
            fmt(PP * g["rel_flip"].abs().median(), 1),
        ])  # fmt: skip
    head1 = ["", "", r"\multicolumn{2}{c}{Taylor (B9)}", r"\multicolumn{2}{c}{moment (B11)}",
             r"flip (B14)"]  # fmt: skip
    head2 = ["bits", "cases", "agree", r"med.\ $|$rel$|$ (\%)", "agree",
             r"med.\ $|$rel$|$ (\%)", r"med.\ $|$rel$|$ (\%)"]  # fmt: skip
    return tabular([head1, head2], rows, "rrrrrrr", header_rules=["(lr){3-4}", "(lr){5-6}"])


#: Table labels of the compression families and the unit of their strength (the
#: ``strength`` column of the compression table, in which the "breaks at" columns are read).
COMPRESSION_LABELS = {
    "prune-layer": ("pruning, per layer", "sparsity"),
    "prune-global": ("pruning, global", "sparsity"),
    "prune-2:4": ("pruning, 2:4", "sparsity"),
    "prune-filter": ("filter pruning (L1)", "share of filters"),
    "svd-energy": ("truncated SVD", "energy kept"),
    "kmeans": ("k-means sharing", "clusters"),
    "power": ("power grid", "bits"),
    "log2": ("powers of two", "bits"),
    "nf4": ("normal float", "bits"),
    "rex-o1": ("REx, order 1", "bits per term"),
    "rex-o2": ("REx, order 2", "bits per term"),
    "rex-o3": ("REx, order 3", "bits per term"),
    "prune50+uniform4": (r"prune 50\,\% + 4 bits", "sparsity"),
}


def _strength(v: Any) -> str:
    """A strength (sparsity, energy, bits...) as it was set: 0.5, 0.95, 16."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return text(v)
    if not math.isfinite(f):
        return NA
    return str(int(f)) if f == int(f) and abs(f) >= 1 else f"{f:g}"


def compression_table(s: Any) -> str:
    """Per model x layer set x family of ``compression_summary.csv``: cells used / all
    (measured flip rate <= the summary's cap), 3L band coverage (%), mean |error| of the flip
    rate of 2L and 3L (pp), the share of cells passing the noise check (%), and the strength
    of the first cell (from the least perturbing) where the measurement leaves the band, the
    error model fails as noise, and the linearization fails."""
    if s is None or not len(s):
        return tabular(["(not available)"], [["no compression rows"]], "l")
    rows, rules, prev = [], [], None
    several_sets = s["layers"].nunique() > 1 if "layers" in s else False
    for i, (_, r) in enumerate(s.iterrows()):
        key = (r["model"], r["layers"]) if several_sets else r["model"]
        if prev is not None and key != prev:
            rules.append(i - 1)
        prev = key
        label, unit = COMPRESSION_LABELS.get(str(r["family"]), (tex_escape(r["family"]), ""))
        band = _value(r, "band_coverage")
        noise = _value(r, "noise_in_band_share")
        model = pretty_model(r["model"]) + (f" ({text(r['layers'])})" if several_sets else "")
        rows.append([
            model, label, tex_escape(unit), f"{int(r['cells_used'])}/{int(r['cells'])}",
            f"{PP * band:.0f}" if math.isfinite(band) else NA,
            fmt(PP * _value(r, "L2L_flip_rate_abs_error")),
            fmt(PP * _value(r, "L3L_flip_rate_abs_error")),
            f"{PP * noise:.0f}" if math.isfinite(noise) else NA,
            *[_strength(r.get(c)) for c in ("breaks_at", "noise_breaks_at", "linear_breaks_at")],
        ])  # fmt: skip
    header = [
        ["", "", "", "", r"in band", r"\multicolumn{2}{c}{mean $|$error$|$ (pp)}", "noise",
         r"\multicolumn{3}{c}{breaks at}"],
        ["model", "family", "strength", "cells", r"(\%)", "2L", "3L", r"(\%)", "band", "noise",
         "linear"],
    ]  # fmt: skip
    return tabular(header, rows, "lllrrrrrrrr", rules_after=rules,
                   header_rules=["(lr){6-7}", "(lr){9-11}"])  # fmt: skip


def compression_numbers(s: Any) -> dict[str, str]:
    r"""``\res`` values of the compression table: families, cells used, and the band coverage
    over every cell used (each family weighted by its cells)."""
    if s is None or not len(s):
        return {}
    used = s["cells_used"].astype(float)
    cov = s["band_coverage"].astype(float)
    ok = used > 0
    out = {
        "comp:families": str(s["family"].nunique()),
        "comp:cells": str(int(s["cells"].sum())),
        "comp:cells:used": str(int(used.sum())),
    }
    if "max_flip_rate" in s:
        out["comp:maxflip"] = f"{float(s['max_flip_rate'].max()):g}"
    if ok.any():
        out["comp:inband"] = f"{PP * (cov[ok] * used[ok]).sum() / used[ok].sum():.0f}"
        fam = s[ok].assign(_c=cov[ok]).groupby("family", sort=False)["_c"].min()
        out["comp:inband:worst"] = f"{PP * fam.min():.0f}"
        out["comp:inband:worstfamily"] = COMPRESSION_LABELS.get(fam.idxmin(),
                                                                (tex_escape(fam.idxmin()),))[0]
    return out


# --------------------------------------------------------------------------- numbers
def numbers(
    t: Any | None, run: dict[str, Any], reports: dict[str, Any], sim: Any | None,
    comp: Any | None = None,
) -> str:
    r"""``\resdef{key}{value}`` lines for the values quoted in the text."""
    out: dict[str, str] = compression_numbers(comp)
    cfg = run.get("config", {})
    accs = run.get("accuracies") or {}
    for model, acc in accs.items():
        out[f"acc:{model}"] = f"{PP * acc:.2f}"
    if accs:
        out["acc:all"] = ", ".join(rf"{pretty_model(m)} {PP * a:.2f}\,\%" for m, a in accs.items())
    if cfg:
        out["n:images"] = str(cfg.get("n") or "all")
        out["n:realizations"] = str(cfg.get("n_realizations", "--"))
        out["n:alllayers"] = str(cfg.get("all_layers_n", "--"))
    if t is not None and len(t):
        out["models"] = ", ".join(pretty_model(m) for m in dict.fromkeys(t["model"]))
        out["bits:min"], out["bits:max"] = str(int(t["bits"].min())), str(int(t["bits"].max()))
        out["bits:split"] = str(SPLIT_BITS)
        out["cells"] = str(len(t))
        last = t[t["layers"] == "last"]
        if len(last):
            out["problems"] = ", ".join(tex_escape(p) for p in dict.fromkeys(last["problem"]))
        grans = [f"per {tex_escape(g)}" for g in dict.fromkeys(t["granularity"])]
        out["granularities"] = " or ".join(grans)
        if "n_eval" in t:
            out["n:eval"] = str(int(t["n_eval"].max()))
        for layers in ("last", "all"):
            s = t[t["layers"] == layers]
            if s.empty:
                continue
            out[f"cells:{layers}"] = str(len(s))
            # the keys say L1-L3 for both layer sets; the all-layer columns are L2L, L3L
            for lv in (1, 2, 3):
                c = f"{level_prefix(lv, layers)}_flip_rate_abs_error"
                if c in s and s[c].notna().any():
                    out[f"err:L{lv}:{layers}"] = fmt(PP * s[c].mean())
                    out[f"maxerr:L{lv}:{layers}"] = fmt(PP * s[c].max())
            if "sakr_flip_rate_abs_error" in s:
                out[f"err:sakr:{layers}"] = fmt(PP * s["sakr_flip_rate_abs_error"].mean())
            if "sakr_vacuous" in s:
                vac = s["sakr_vacuous"].astype(str).str.lower().isin(["true", "1", "1.0"])
                out[f"sakr:vacuous:{layers}"] = f"{PP * vac.mean():.0f}"
            elif "sakr_flip_rate_bound_raw" in s:
                vac = s["sakr_flip_rate_bound_raw"] >= 1
                out[f"sakr:vacuous:{layers}"] = f"{PP * vac.mean():.0f}"
            l3 = level_prefix(3, layers)
            band_col = f"{l3}_flip_rate_in_band"
            if band_col in s and s[band_col].notna().any():
                out[f"inband:{layers}"] = f"{PP * s[band_col].astype(float).mean():.0f}"
            # the same below SPLIT_BITS ("low") and from it on ("high")
            for part, sel in (("low", s["bits"] < SPLIT_BITS), ("high", s["bits"] >= SPLIT_BITS)):
                r = s[sel]
                if r.empty:
                    continue
                out[f"cells:{layers}:{part}"] = str(len(r))
                err_col = f"{l3}_flip_rate_abs_error"
                if err_col in r and r[err_col].notna().any():
                    out[f"err:L3:{layers}:{part}"] = fmt(PP * r[err_col].mean())
                if band_col in r and r[band_col].notna().any():
                    band = r[band_col].astype(float).mean()
                    out[f"inband:{layers}:{part}"] = f"{PP * band:.0f}"
    for i, (model, rep) in enumerate(reports.items()):
        s = rep.gaussian_summary().set_index("kind")
        for kind in s.index:
            tot = s.loc[kind, "n_variables"]
            holds = f"{PP * s.loc[kind, 'holds'] / tot:.0f}"
            fails = f"{PP * s.loc[kind, 'fails'] / tot:.0f}"
            out[f"hg:holds:{model}:{kind}"], out[f"hg:fails:{model}:{kind}"] = holds, fails
            if i == 0:  # the first model's, quoted in the text
                out["hg:model"] = pretty_model(model)
                out[f"hg:holds:{kind}"], out[f"hg:fails:{kind}"] = holds, fails
    # share of (model, quantizer, layer, bit-width) whose error fails H_U, per bit range
    frames = [rep.uniform for rep in reports.values() if len(getattr(rep, "uniform", ()))]
    if frames:
        import pandas as pd

        from distortion.experiments.hypotheses import ALL_LAYERS

        u = pd.concat(frames, ignore_index=True)
        u = u[u["layer"] != ALL_LAYERS]
        for part, sel in (("low", u["bits"] < SPLIT_BITS), ("high", u["bits"] >= SPLIT_BITS)):
            if sel.any():
                out[f"hu:fails:{part}"] = f"{PP * (u.loc[sel, 'verdict'] == 'fails').mean():.0f}"
    if sim is not None:
        out["sim:cases"] = str(sim.groupby(["d", "covariance", "separation", "weights"]).ngroups)
    lines = [rf"\resdef{{{k}}}{{{v}}}" for k, v in out.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver
def incomplete_note(missing: Sequence[Any]) -> str:
    """A framed note for the first page listing the missing inputs (empty when none)."""
    if not missing:
        return "% the results folder is complete\n"
    items = "\n".join(rf"\item {tex_escape(str(m))}" for m in missing)
    return (
        "\\begin{center}\\fbox{\\parbox{0.95\\linewidth}{\\small\\textbf{Incomplete results:} "
        "the figures, tables and numbers (\\textbf{??}) that need these inputs are missing or "
        "partial.\n"
        f"\\begin{{itemize}}\n{items}\n\\end{{itemize}}}}}}\\end{{center}}\n"
    )


def _reports(results: Path) -> dict[str, Any]:
    sys.path.insert(0, str(_paths.PAPER / "figures"))
    import _style

    return _style.hypothesis_reports(results)


def make(results: Path, out: Path) -> list[Path]:
    """Write every table into ``out`` (the tables folder); return the paths."""
    import pandas as pd

    paths = []
    csv = results / "comparison.csv"
    t = pd.read_csv(csv) if csv.is_file() else None
    if t is None:
        print(f"skipped: comparison tables (no {csv})", file=sys.stderr)
    run_file = results / "run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    reports = _reports(results)
    sim_csv = _paths.simulation_table(results)
    sim = pd.read_csv(sim_csv) if sim_csv.is_file() else None
    comp_csv = _paths.compression_summary(results)
    comp = pd.read_csv(comp_csv) if comp_csv.is_file() else None

    paths.append(_write(out, "summary", summary_table(t) if t is not None
                        else placeholder("comparison table", csv)))  # fmt: skip
    for layers, name in (("last", "cells"), ("all", "cells_all")):
        if t is None:
            body, desc = placeholder("comparison table", csv), ""
        else:
            body, desc = cells_table(t, layers)
        paths.append(_write(out, name, body))
        paths.append(_write(out, f"{name}_caption", desc + "%\n"))
    hyp = results / "hypotheses"
    paths.append(_write(out, "hypotheses_gaussian", hypotheses_gaussian_table(reports)
                        if reports else placeholder("hypothesis tests", hyp)))  # fmt: skip
    paths.append(_write(out, "hypotheses_uniform", hypotheses_uniform_table(reports)
                        if reports else placeholder("hypothesis tests", hyp)))  # fmt: skip
    paths.append(_write(out, "simulation", simulation_table(sim) if sim is not None
                        else placeholder("simulation table", sim_csv)))  # fmt: skip
    paths.append(_write(out, "compression", compression_table(comp) if comp is not None
                        else placeholder("compression summary", comp_csv)))  # fmt: skip
    paths.append(_write(out, "numbers", numbers(t, run, reports, sim, comp)))
    sys.path.insert(0, str(_paths.PAPER / "figures"))
    import _inputs

    paths.append(_write(out, "incomplete", incomplete_note(_inputs.missing_inputs(results))))
    return paths


def main(argv: list[str] | None = None) -> None:
    args = _paths.parse_args(__doc__.splitlines()[0], argv)
    for p in make(_paths.results_dir(args.results), _paths.tables_dir(args.out)):
        print(p)


if __name__ == "__main__":
    main()
