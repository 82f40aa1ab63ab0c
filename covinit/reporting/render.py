"""Pages and tables of a calibration report: HTML, Markdown, JSON and a terminal table.

:func:`write_pages` writes ``report.html`` (self-contained: figures base64-embedded, no
network needed), ``report.md`` and ``summary.json``; :func:`format_table` prints the same
numbers as a plain-text table; :class:`Report` is what :func:`covinit.report` returns.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covinit.reporting.figures import slug
from covinit.reporting.plan import ReportPlan
from covinit.reporting.summaries import SideSummary, format_value, jsonable

__all__ = ["Report", "format_table", "report_context", "write_pages"]


@dataclass
class Report:
    """What :func:`covinit.report` wrote.

    Attributes
    ----------
    summaries : list of SideSummary
        In layer order, input before output.
    out_dir : Path
    html, markdown, json : Path
        ``report.html`` (self-contained), ``report.md``, ``summary.json``.
    figures : list of Path
        PNG files (``overview.png`` and one per layer side), empty with ``figures=False``.
    skipped : dict
        ``"layer/side" -> reason`` for sides that could not be summarised (sketched).
    seconds : float
    """

    summaries: list[SideSummary]
    out_dir: Path
    html: Path
    markdown: Path
    json: Path
    figures: list[Path]
    skipped: dict[str, str]
    seconds: float

    def table(self) -> str:
        """:func:`format_table` of :attr:`summaries`."""
        return format_table(self.summaries)


def _table(summaries: list[SideSummary], max_layer_width: int) -> tuple[list[str],
                                                                        list[list[str]]]:
    """Header and cell strings shared by the terminal, HTML and Markdown tables."""
    with_angles = any(r.angles_deg is not None for r in summaries)
    with_sp = any(r.spatpca is not None for r in summaries)
    with_step = any(r.step_ratio is not None for r in summaries)
    header = ["layer", "side", "k", "n", "r", "eff.rank", "PR", "expl@r", "cond", "cond LW",
              "LW s", "OAS s"]
    if with_angles:
        header.append("∠W0 °")
    if with_step:
        header.append("step/K")
    if with_sp:
        header += ["τ1", "τ2", "γ"]
    rows = []
    for r in summaries:
        name = r.layer if len(r.layer) <= max_layer_width else "…" + r.layer[
            -(max_layer_width - 1):]
        mark = {"budget": "*", "adapter": "a"}.get(r.rank_source, "")
        line = [name, r.side, str(r.k), str(r.n), f"{r.rank}{mark}", f"{r.effective_rank:.1f}",
                f"{r.participation_ratio:.1f}", f"{100 * r.explained:.1f}%",
                format_value(r.condition.get("empirical")),
                format_value(r.condition.get("ledoit_wolf")),
                format_value(r.shrinkage.get("ledoit_wolf")), format_value(r.shrinkage.get("oas"))]
        if with_angles:
            angle = r.max_angle_deg
            line.append("-" if angle is None else f"{angle:.1f}")
        if with_step:
            line.append(format_value(r.step_ratio))
        if with_sp:
            sp = r.spatpca or {}
            line += [format_value(sp.get(key)) for key in ("tau1", "tau2", "gamma")]
        rows.append(line)
    return header, rows


def format_table(summaries: Iterable[SideSummary], *, max_layer_width: int = 48) -> str:
    """A plain-text table of :class:`SideSummary` rows, one per layer side.

    Columns: layer, side, k, n, r (``*`` = allocated by a budget, ``a`` = the adapter's),
    effective rank, participation ratio, explained variance at r, condition numbers of the
    empirical and Ledoit-Wolf estimates, LW and OAS shrinkage; with a model the largest
    principal angle to W0's subspace; with smooth PCA τ1, τ2, γ.

    Parameters
    ----------
    summaries : iterable of SideSummary
    max_layer_width : int, default=48
        Longer layer names are shortened from the left (``…layer.5.attention.self.query``).

    Returns
    -------
    str
        Header, a rule, and one line per summary (no trailing newline).
    """
    rows = list(summaries)
    if not rows:
        return "(no layer sides)"
    header, cells = _table(rows, max_layer_width)
    table = [header, *cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for i, row in enumerate(table):
        padded = [cell.ljust(w) if j < 2 else cell.rjust(w)
                  for j, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(padded).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)



def report_context(plan: ReportPlan) -> dict[str, Any]:
    """The page's header: what was calibrated (from the file's info) and what was reported."""
    cal = plan.calibration
    info = dict(cal.info)
    n_sp = len(plan.spatpca_layers)
    sp_options = plan.spatpca_options
    ctx: dict[str, Any] = {
        "layers": len(cal.layer_names), "sides": list(cal.sides), "folds": cal.n_folds,
        "positions": info.get("positions"), "batches": info.get("batches"),
        "precision": info.get("precision"), "calibration seconds": info.get("seconds"),
        "model fingerprint": str(cal.fingerprint.get("sha256", ""))[:16],
        "estimators": ", ".join(plan.estimators),
        "rank": plan.rank if plan.rank_budget is None else f"budget {plan.rank_budget}",
        "principal angles": "yes" if plan.with_model else "no (pass the model)",
        "smooth PCA": f"{n_sp} layer(s)" + (f", options {dict(sp_options)}" if sp_options
                                            else "") if n_sp else "no",
    }
    for key in ("model", "data", "targets"):
        if key in info:
            ctx[key] = info[key]
    return ctx


def write_pages(out: Path, title: str, context: Mapping[str, Any],
                summaries: list[SideSummary], skipped: Mapping[str, str],
                images: Mapping[str, bytes]) -> tuple[Path, Path, Path]:
    """Write ``report.html``, ``report.md`` and ``summary.json`` into ``out``.

    Parameters
    ----------
    out : Path
        Created if needed.
    title : str
    context : mapping
        Header lines (:func:`report_context`).
    summaries : list of SideSummary
    skipped : mapping
        ``"layer/side" -> reason``.
    images : mapping
        ``"overview"`` or a summary's ``figure`` ``-> PNG bytes``, embedded in the HTML.

    Returns
    -------
    tuple of Path
        The HTML, Markdown and JSON files.
    """
    out.mkdir(parents=True, exist_ok=True)
    html_path, md_path, json_path = out / "report.html", out / "report.md", out / "summary.json"
    html_path.write_text(_html(title, context, summaries, skipped, images), encoding="utf-8")
    md_path.write_text(_markdown(title, context, summaries, skipped), encoding="utf-8")
    json_path.write_text(json.dumps(
        {"title": title, "context": jsonable(context),
         "layers": [s.to_dict() for s in summaries], "skipped": dict(skipped)}, indent=1),
        encoding="utf-8")
    return html_path, md_path, json_path


_DEFINITIONS = [
    ("eff.rank", "exp of the spectral entropy, exp(−Σ p·log p), p = λ/Σλ (1 … k)"),
    ("PR", "participation ratio (Σλ)²/Σλ²"),
    ("expl@r", "share of the variance in the top-r directions (r = LoRA rank; "
               "* = allocated by a budget, a = the adapter's own)"),
    ("cond / cond LW", "λ_max/λ_min of the empirical / Ledoit-Wolf covariance "
                       "(inf = singular)"),
    ("LW s / OAS s", "shrinkage intensity s of (1−s)·S + s·μ·I"),
    ("∠W0", "largest principal angle between the top-r data directions and W0's top-r "
            "singular subspace (PiSSA's); 0° = same directions"),
    ("step/K", "first Adam step's output change over Kaiming's expected one (1 = "
               "scale='matched'; exact with a gradient side, closed form for B = 0 without)"),
    ("τ1, τ2, γ", "SpatPCA's cross-validated roughness, sparsity and eigenvalue shrinkage"),
]


def _html(title: str, context: Mapping[str, Any], summaries: list[SideSummary],
          skipped: Mapping[str, str], images: Mapping[str, bytes]) -> str:
    esc = html.escape

    def img(key: str, alt: str) -> str:
        data = base64.b64encode(images[key]).decode("ascii")
        return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'

    head, table_rows = _table(summaries, max_layer_width=10_000)
    body_rows = []
    for summary, cells in zip(summaries, table_rows, strict=True):
        anchor = f"{slug(summary.layer)}__{summary.side}"
        first = (f'<a href="#{anchor}">{esc(cells[0])}</a>' if summary.figure
                 else esc(cells[0]))
        tds = [f"<td>{first}</td>"] + [f"<td>{esc(c)}</td>" for c in cells[1:]]
        body_rows.append("<tr>" + "".join(tds) + "</tr>")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;"
        "color:#222;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}"
        "th{background:#f0f0f0}tr:nth-child(even){background:#fafafa}"
        "img{max-width:100%;border:1px solid #eee;margin:6px 0}"
        "dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:13px}"
        "dt{font-weight:600}code{background:#f4f4f4;padding:0 3px}</style></head><body>",
        f"<h1>{esc(title)}</h1>", "<dl>",
        *(f"<dt>{esc(str(k))}</dt><dd>{esc(str(v))}</dd>" for k, v in context.items()
          if v is not None),
        "</dl>", "<h2>Summary</h2>", "<table><thead><tr>",
        *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>", *body_rows,
        "</tbody></table>", "<h3>Columns</h3><dl>",
        *(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _DEFINITIONS), "</dl>",
    ]
    if skipped:
        parts.append("<h3>Skipped</h3><ul>")
        parts += [f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in skipped.items()]
        parts.append("</ul>")
    if "overview" in images:
        parts += ["<h2>Overview</h2>", img("overview", "overview across layers")]
    figs = [s for s in summaries if s.figure]
    if figs:
        parts.append("<h2>Layers</h2>")
    for s in figs:
        anchor = f"{slug(s.layer)}__{s.side}"
        extra = f" (input shared with <code>{esc(s.shared_with)}</code>)" if s.shared_with \
            else ""
        parts += [f'<h3 id="{anchor}"><code>{esc(s.layer)}</code> · {esc(s.side)}{extra}</h3>',
                  img(s.figure, f"{s.layer} {s.side}")]  # type: ignore[arg-type]
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(title: str, context: Mapping[str, Any], summaries: list[SideSummary],
              skipped: Mapping[str, str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in context.items() if v is not None]
    lines += ["", "## Summary", ""]
    header, rows = _table(summaries, max_layer_width=10_000)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += ["", "## Columns", ""]
    lines += [f"- **{k}**: {v}" for k, v in _DEFINITIONS]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()]
    figs = [s for s in summaries if s.figure]
    if figs:
        lines += ["", "## Figures", "", "![overview](figures/overview.png)", ""]
        lines += [f"![{s.layer} {s.side}]({s.figure})" for s in figs]
    return "\n".join(lines) + "\n"

