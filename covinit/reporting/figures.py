"""Figures of a calibration report (matplotlib, drawn on private Agg canvases).

:func:`write_figures` draws ``overview.png`` (effective rank, shrinkage and angles to W0
across layers) and one PNG per layer side (spectra of each estimator, the cumulative
explained variance with the LoRA rank marked, and SpatPCA's loadings when fitted).  No
pyplot: the figures change no global matplotlib state.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covinit.reporting.summaries import SideSummary, format_value

__all__ = ["slug", "write_figures"]

_COLORS = {"empirical": "#444444", "ledoit_wolf": "#1f77b4", "oas": "#ff7f0e",
           "nonlinear": "#2ca02c", "spatpca": "#d62728"}


def slug(name: str) -> str:
    """A file-name and HTML-anchor safe form of a layer name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "layer"


def write_figures(summaries: Sequence[SideSummary], fig_dir: Path, dpi: int,
                  max_figures: int | None = None) -> tuple[dict[str, bytes], list[Path]]:
    """Draw and write the overview and the per-side figures.

    Sets each drawn summary's :attr:`~SideSummary.figure` to its path relative to the
    report folder (``figures/<layer>__<side>.png``).

    Parameters
    ----------
    summaries : sequence of SideSummary
    fig_dir : Path
        Created if needed.
    dpi : int
    max_figures : int, optional
        Per-side figures for the first ``max_figures`` summaries only.

    Returns
    -------
    images : dict
        ``"overview"`` or a summary's ``figure`` path ``-> PNG bytes``.
    paths : list of Path
        Files written, the overview first.
    """
    fig_dir.mkdir(parents=True, exist_ok=True)
    overview = _overview_png(list(summaries), dpi)
    images = {"overview": overview}
    (fig_dir / "overview.png").write_bytes(overview)
    paths = [fig_dir / "overview.png"]
    for i, summary in enumerate(summaries):
        if max_figures is not None and i >= max_figures:
            break
        png = _side_png(summary, dpi)
        fname = f"{slug(summary.layer)}__{summary.side}.png"
        (fig_dir / fname).write_bytes(png)
        summary.figure = f"figures/{fname}"
        images[summary.figure] = png
        paths.append(fig_dir / fname)
    return images, paths


def _new_figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas: no pyplot, so no global backend or state changes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("covinit.report's figures need matplotlib: pip install "
                          "'covinit[bench]', or pass figures=False (tables and pages only)"
                          ) from None

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _plain_log_ticks(ax: Any, axis: str) -> None:
    """Log-scale ticks labelled as plain numbers, without minor ticks: mathtext labels
    (10^k) and the minor-tick artists were most of the drawing time of a figure."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_locator(NullLocator())  # minor ticks: many artists, little information


def _short(name: str, parts: int = 4) -> str:
    return ".".join(name.split(".")[-parts:])


def _side_png(s: SideSummary, dpi: int) -> bytes:
    """Spectra, explained-variance curve and (when fitted) SpatPCA loadings of one side."""
    panels = 3 if s.loadings is not None else 2
    grid = (s.spatpca or {}).get("grid")
    fig, axes = _side_layout(s, panels, grid)
    _spectra_panel(axes[0], s)
    _explained_panel(axes[1], s)
    caption = None
    if s.loadings is not None and s.spatpca is not None and grid is not None:
        caption = _grid_loadings(axes[2:], s, grid)
    elif s.loadings is not None and s.spatpca is not None:
        _loadings_panel(fig, axes[2], s)
    notes = [f"LW s={s.shrinkage['ledoit_wolf']:.3g}", f"OAS s={s.shrinkage['oas']:.3g}",
             f"cond={format_value(s.condition.get('empirical'))}"]
    if s.max_angle_deg is not None:
        notes.append(f"max ∠(top-{s.rank}, W0's) = {s.max_angle_deg:.1f}°")
    fig.suptitle(f"{s.layer} · {s.side}    " + "   ".join(notes), fontsize=9)
    # Fixed margins: tight_layout measures every tick label and took ~half the time.
    fig.subplots_adjust(left=0.07 if panels == 2 else 0.05, right=0.97 if panels == 2 else 0.94,
                        bottom=0.14, top=0.84, wspace=0.25)
    if caption is not None:  # under the loading images, once their position is final
        fig.text(axes[2].get_position().x0, 0.03, caption, fontsize=8)
    return _png(fig, dpi)


def _side_layout(s: SideSummary, panels: int, grid: Any) -> tuple[Any, list[Any]]:
    """The figure and its axes: spectra, explained variance, then the loadings' panel(s)."""
    if s.loadings is not None and grid is not None:
        # Features on a 2-D grid: each loading vector is drawn as an image of that grid.
        n_img = s.loadings.shape[1]
        per_row = math.ceil(n_img / 2)
        fig = _new_figure(9.2 + 1.25 * per_row, 3.5)
        spec = fig.add_gridspec(2, 2 + per_row, width_ratios=[3.0, 3.0] + [1.0] * per_row)
        axes = [fig.add_subplot(spec[:, 0]), fig.add_subplot(spec[:, 1])]
        axes += [fig.add_subplot(spec[j // per_row, 2 + j % per_row]) for j in range(n_img)]
        return fig, axes
    fig = _new_figure(4.6 * panels, 3.5)
    return fig, list(fig.subplots(1, panels))


def _spectra_panel(ax: Any, s: SideSummary) -> None:
    """Each estimator's eigenvalues (log scale), the LoRA rank marked."""
    idx = np.arange(1, s.k + 1)
    drawn = False
    for name, lam in s.spectra.items():
        y = np.where(lam > 0.0, lam, np.nan)  # log scale: zero/negative eigenvalues unshown
        if np.isfinite(y).any():
            ax.plot(idx, y, label=name, color=_COLORS.get(name), lw=1.2,
                    ls="-" if name == "empirical" else "--")
            drawn = True
    if drawn:
        ax.set_yscale("log")
        _plain_log_ticks(ax, "y")
        ax.legend(fontsize=7)
        # Null-space eigenvalues (n < k, centring) are rounding noise at 1e-30: do not let
        # them squash the informative part of the spectrum.
        top = max(float(np.nanmax(v)) for v in s.spectra.values())
        low = min((float(v[v > 0].min()) for v in s.spectra.values() if (v > 0).any()),
                  default=top)
        ax.set_ylim(bottom=0.5 * max(low, 1e-10 * top))
    ax.axvline(s.rank, color="#888888", ls=":", lw=1)
    if s.k > 64:
        ax.set_xscale("log")
        _plain_log_ticks(ax, "x")
    ax.set_title(f"eigenvalues (k={s.k}, n={s.n})", fontsize=9)
    ax.set_xlabel("component", fontsize=8)
    ax.tick_params(labelsize=7)


def _explained_panel(ax: Any, s: SideSummary) -> None:
    """Cumulative explained variance, with the rank and the effective rank marked."""
    idx = np.arange(1, s.k + 1)
    lam = np.clip(s.spectra["empirical"], 0.0, None)
    total = lam.sum()
    cum = np.cumsum(lam) / total if total > 0 else np.zeros_like(lam)
    ax.plot(idx, cum, color="#444444", lw=1.2)
    ax.axvline(s.rank, color="#d62728", ls="--", lw=1)
    ax.plot([s.rank], [cum[s.rank - 1]], "o", color="#d62728")
    how = {"budget": " (budget)", "adapter": " (adapter)"}.get(s.rank_source, "")
    ax.annotate(f"r={s.rank}{how}: {100 * cum[s.rank - 1]:.1f}%", (s.rank, cum[s.rank - 1]),
                textcoords="offset points", xytext=(6, -12), fontsize=8, color="#d62728")
    if s.effective_rank >= 1:
        ax.axvline(s.effective_rank, color="#1f77b4", ls=":", lw=1,
                   label=f"effective rank {s.effective_rank:.1f}")
        ax.legend(fontsize=7, loc="lower right")
    if s.k > 64:
        ax.set_xscale("log")
        _plain_log_ticks(ax, "x")
    ax.set_ylim(0, 1.02)
    ax.set_title("cumulative explained variance", fontsize=9)
    ax.set_xlabel("components", fontsize=8)
    ax.tick_params(labelsize=7)


def _grid_loadings(axes: Sequence[Any], s: SideSummary, grid: Sequence[int]) -> str:
    """Each SpatPCA loading vector as an image of the feature grid; returns the caption."""
    assert s.loadings is not None and s.spatpca is not None
    rows, cols = grid
    bound = float(np.abs(s.loadings).max()) or 1.0
    for j, ax in enumerate(axes):
        ax.imshow(s.loadings[:, j].reshape(rows, cols), cmap="RdBu_r", vmin=-bound,
                  vmax=bound, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"Φ{j + 1}", fontsize=8)
    sp = s.spatpca
    return (f"SpatPCA loadings on the {rows}×{cols} grid: τ1={format_value(sp['tau1'])}, "
            f"τ2={format_value(sp['tau2'])}, γ={format_value(sp['gamma'])}")


def _loadings_panel(fig: Any, ax: Any, s: SideSummary) -> None:
    """SpatPCA loadings (r, k) as a heat map over the features."""
    assert s.loadings is not None and s.spatpca is not None
    load = s.loadings.T  # (r, k)
    bound = float(np.abs(load).max()) or 1.0
    image = ax.imshow(load, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.05)
    sp = s.spatpca
    ax.set_title(f"SpatPCA loadings: τ1={format_value(sp['tau1'])}, "
                 f"τ2={format_value(sp['tau2'])}, γ={format_value(sp['gamma'])}", fontsize=9)
    ax.set_xlabel(f"feature ({sp.get('geometry')} geometry)", fontsize=8)
    ax.set_ylabel("component", fontsize=8)
    ax.tick_params(labelsize=7)


def _overview_png(summaries: list[SideSummary], dpi: int) -> bytes:
    """Effective rank, shrinkage and angles to W0 across layers, one line per side."""
    layers = list(dict.fromkeys(s.layer for s in summaries))
    pos = {name: i for i, name in enumerate(layers)}
    with_angles = any(s.angles_deg is not None for s in summaries)
    rows = 3 if with_angles else 2
    fig = _new_figure(max(8.0, 0.22 * len(layers) + 3), 2.3 * rows + 1.4)
    axes = fig.subplots(rows, 1, sharex=True)
    styles = {"input": ("o", "#1f77b4"), "output": ("s", "#ff7f0e")}
    for side, (marker, color) in styles.items():
        mine = [s for s in summaries if s.side == side]
        if not mine:
            continue
        x = [pos[s.layer] for s in mine]
        axes[0].plot(x, [s.effective_rank / s.k for s in mine], marker, color=color, ms=4,
                     label=f"{side}: eff.rank / k")
        axes[0].plot(x, [s.explained for s in mine], marker, color=color, ms=4,
                     mfc="none", label=f"{side}: explained @ r")
        axes[1].plot(x, [s.shrinkage["ledoit_wolf"] for s in mine], marker, color=color, ms=4,
                     label=f"{side}: Ledoit-Wolf")
        axes[1].plot(x, [s.shrinkage["oas"] for s in mine], marker, color=color, ms=4,
                     mfc="none", label=f"{side}: OAS")
        if with_angles:
            got = [s for s in mine if s.max_angle_deg is not None]
            axes[2].plot([pos[s.layer] for s in got], [s.max_angle_deg for s in got], marker,
                         color=color, ms=4, label=f"{side}: largest angle")
            axes[2].plot([pos[s.layer] for s in got],
                         [float(np.mean(s.angles_deg)) for s in got], marker, color=color,
                         ms=4, mfc="none", label=f"{side}: mean angle")
    axes[0].set_ylabel("fraction", fontsize=8)
    axes[0].set_title("effective rank / width and explained variance at the LoRA rank",
                      fontsize=9)
    axes[1].set_ylabel("s", fontsize=8)
    axes[1].set_title("shrinkage intensity", fontsize=9)
    if with_angles:
        axes[2].set_ylabel("degrees", fontsize=8)
        axes[2].set_ylim(0, 92)
        axes[2].set_title("principal angles: top-r data directions vs W0's top-r singular "
                          "subspace (PiSSA)", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=7, ncols=2, loc="best")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(range(len(layers)))
    axes[-1].set_xticklabels([_short(n) for n in layers], rotation=90, fontsize=6)
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.35 / height, bottom=1.3 / height,
                        hspace=0.35)
    return _png(fig, dpi)

