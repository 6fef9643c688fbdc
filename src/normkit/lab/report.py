"""The lab's report: one self-contained ``report.html`` (figures inlined as base64), ``report.md`` and the cube figure."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import numpy as np

from . import plots
from .schema import SCHEMA_VERSION
from .stats import HOLDS, NOT, PARTLY

BADGE = {HOLDS: "#1a7f37", PARTLY: "#9a6700", NOT: "#cf222e"}


def cube_figure(out_dir: Path) -> str:
    """What each norm normalizes over: the (N, C, H*W) cube with one statistics set shaded (Wu & He 2018, fig. 2)."""
    n, c, s = 4, 6, 5
    sets = {
        "BatchNorm": lambda i, j, k: j == 0,
        "LayerNorm": lambda i, j, k: i == 0,
        "InstanceNorm": lambda i, j, k: i == 0 and j == 0,
        "GroupNorm (2 groups)": lambda i, j, k: i == 0 and j < c // 2,
    }
    fig = plots.plt.figure(figsize=(14, 4.2))
    for index, (name, member) in enumerate(sets.items()):
        ax = fig.add_subplot(1, 4, index + 1, projection="3d")
        filled = np.ones((n, c, s), dtype=bool)
        colors = np.empty(filled.shape, dtype=object)
        for i in range(n):
            for j in range(c):
                for k in range(s):
                    colors[i, j, k] = "#4a90d9" if member(i, j, k) else "#eeeeee"
        ax.voxels(filled, facecolors=colors, edgecolor="#555555", linewidth=0.3)
        ax.set_xlabel("N (batch)")
        ax.set_ylabel("C (channels)")
        ax.set_zlabel("H, W (spatial)", labelpad=-8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_zticks([])
        ax.set_title(name, pad=0)
        ax.view_init(elev=22, azim=-58)
        ax.set_box_aspect(None, zoom=0.85)
    fig.suptitle("Shaded: the elements that share one mean and variance", y=0.98)
    fig.subplots_adjust(left=0.0, right=0.97, bottom=0.02, top=0.86, wspace=0.05)
    return plots.save(fig, out_dir, "norms_cube.png", tight_layout=False)


def _img(out_dir: Path, name: str, alt: str) -> str:
    data = base64.b64encode((out_dir / name).read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>{html.escape(name)}</figcaption></figure>'


def _table_html(table: dict) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table["columns"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in table["rows"])
    return f"<h4>{html.escape(table['title'])}</h4><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and np.isfinite(value) else "n/a"


def effect_text(effect: dict) -> str:
    """``estimate unit [low, high]`` with Hedges' g when present; missing numbers read ``n/a``."""
    g = effect.get("g")
    g_text = f", Hedges' g {_num(g, '.2f')}" if _num(g, ".2f") != "n/a" else ""
    return f"{_num(effect['estimate'], '.3g')} {effect['unit']} [95% CI {_num(effect['low'], '.3g')}, {_num(effect['high'], '.3g')}]{g_text}"


def scope_text(meta: dict) -> str:
    """Which studies train on the chosen image data, and which studies this report leaves out: a run labelled with
    one dataset or a partial rerun must not read as if it covered every study."""
    used_by = ", ".join(meta["data_used_by"]) or "no study"
    text = f"image data {meta['data']} for {used_by} only (every other study uses the data its setting names)"
    if meta["left_out"]:
        text += f"; not in this report, as their runs are not all cached: {', '.join(meta['left_out'])}"
    return text


def _badge(verdict: str) -> str:
    return f'<span class="verdict" style="background:{BADGE[verdict]}">{html.escape(verdict)}</span>'


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2328;line-height:1.45}
h1{margin-bottom:0}.sub{color:#57606a;margin-top:.2em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}th,td{border:1px solid #d0d7de;padding:3px 7px;text-align:left}
th{background:#f6f8fa}.verdict{color:#fff;border-radius:4px;padding:2px 8px;font-weight:600;white-space:nowrap}
blockquote{margin:.6em 0;padding:.3em 1em;border-left:4px solid #d0d7de;color:#424a53}blockquote.zh{font-size:1.05em}
section.claim{border-top:2px solid #d0d7de;margin-top:2em;padding-top:.5em}
figure{margin:.8em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.75em;color:#57606a}
.rule{font-size:.85em;color:#57606a}code{background:#f6f8fa;padding:1px 4px}
"""


def render_html(results: dict, out_dir: Path) -> str:
    meta = results["meta"]
    overview = "".join(
        f'<tr><td><a href="#claim-{s["id"]}">{s["number"]}. {html.escape(s["title"])}</a></td><td>{_badge(s["verdict"])}</td>'
        f"<td>{html.escape(s['effect']['name'])}: {html.escape(effect_text(s['effect']))}</td></tr>"
        for s in results["studies"]
    )
    sections = []
    for s in results["studies"]:
        parts = [
            f'<section class="claim" id="claim-{s["id"]}"><h2>{s["number"]}. {html.escape(s["title"])}</h2>',
            f'<p class="rule">Article: {html.escape(s["claim"]["source"])}</p>',
            f'<blockquote class="zh" lang="zh">{html.escape(s["claim"]["zh"])}</blockquote>',
            f'<blockquote lang="en">{html.escape(s["claim"]["en"])}</blockquote>',
            f"<p><b>Verdict:</b> {_badge(s['verdict'])} &mdash; {html.escape(s['reason'])}</p>",
            f"<p><b>Effect:</b> {html.escape(s['effect']['name'])} = {html.escape(effect_text(s['effect']))}</p>",
            f"<p><b>Setting:</b> {html.escape(s['setting'])} ({s['n_runs']} runs)</p>",
            f'<p class="rule"><b>Rule (in code):</b> {html.escape(s["rule"])}</p>',
        ]
        parts += [_table_html(t) for t in s["tables"]]
        parts += [_img(out_dir, f, f"{s['title']}: {f}") for f in s["figures"]]
        parts += [f"<p>{html.escape(n)}</p>" for n in s["notes"]]
        sections.append("\n".join(parts) + "</section>")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    machine = ", ".join(f"{k}: {v}" for k, v in meta["machine"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>normkit lab report</title><style>{CSS}</style></head>
<body><h1>normkit lab</h1>
<p class="sub">Every claim of the article &ldquo;浅谈归一化&rdquo; (On normalization) re-measured on training runs.</p>
<p>Mode <code>{meta['mode']}</code>, seeds {meta['seeds']}, backend <code>{meta['backend']}</code>, device <code>{meta['device']}</code>;
{html.escape(scope_text(meta))}; {meta['runs_total']} runs ({meta['runs_reused']} reused from the cache), wall time {meta['wall_time_s']:.0f} s,
compute {meta['compute_time_s']:.0f} s, {meta['jobs']} worker(s) via {meta['executor']}; started {meta['started_utc']}.<br>
Machine: {html.escape(machine)}.<br>Versions: {html.escape(versions)}.</p>
<p>Intervals are 95% confidence intervals over seeds (Student t, or percentile bootstrap where stated). Verdicts come from the rule
shown in each section, applied to these numbers; <i>{NOT}</i> means not on this data and at this scale.</p>
<h2>Verdicts</h2><table><thead><tr><th>claim</th><th>verdict</th><th>effect [95% CI]</th></tr></thead><tbody>{overview}</tbody></table>
<h2>What each norm normalizes over</h2>{_img(out_dir, results['figures']['cube'], 'N/C/HW cube for BN, LN, IN, GN')}
{''.join(sections)}
<p class="rule">Machine-readable results: <code>results.json</code> (schema {SCHEMA_VERSION}, documented in <code>normkit.lab.schema</code>).</p>
</body></html>
"""


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# normkit lab report",
        "",
        f"Mode `{meta['mode']}`, seeds {meta['seeds']}, backend `{meta['backend']}`, device `{meta['device']}`; {scope_text(meta)}; "
        f"{meta['runs_total']} runs ({meta['runs_reused']} reused), wall time {meta['wall_time_s']:.0f} s.",
        "",
        "| # | claim | verdict | effect [95% CI] |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s['number']} | {s['title']} | {s['verdict']} | {s['effect']['name']}: {effect_text(s['effect'])} |" for s in results["studies"]]
    lines += ["", f"![What each norm normalizes over]({results['figures']['cube']})", ""]
    for s in results["studies"]:
        lines += [f"## {s['number']}. {s['title']}", "", f"> {s['claim']['zh']}", ">", f"> {s['claim']['en']}", "",
                  f"*Article: {s['claim']['source']}*", "", f"**Verdict: {s['verdict']}** — {s['reason']}", "",
                  f"**Effect:** {s['effect']['name']} = {effect_text(s['effect'])}", "", f"**Setting:** {s['setting']} ({s['n_runs']} runs)", "",
                  f"**Rule:** {s['rule']}", ""]  # fmt: skip
        for t in s["tables"]:
            lines += [f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
            lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in t["rows"]]
            lines.append("")
        lines += [f"![{s['title']}]({f})" for f in s["figures"]] + [""] + [n + "\n" for n in s["notes"]]
    lines += [f"Results: `results.json`, schema `{SCHEMA_VERSION}` (see `normkit.lab.schema`)."]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write(results: dict, out_dir: Path) -> Path:
    """Write report.html and report.md next to the PNGs; returns the HTML path."""
    out_dir = Path(out_dir)
    _atomic_write(out_dir / "report.md", render_markdown(results))
    path = out_dir / "report.html"
    _atomic_write(path, render_html(results, out_dir))
    return path
