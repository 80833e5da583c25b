"""report.md and report.html: the human-readable sides of manifest.json.

report.html is one self-contained file (plots as base64 PNG data URIs, no scripts, no outside requests) that is
a pure function of the manifest; everything taken from the manifest is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from edgecompress.manifest import Manifest
from edgecompress.tasknames import DECODER_TASK


def _num(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


def _counted(m: Manifest) -> str:
    """What fidelity and the export check count: a decoder is judged per predicted token, an encoder per text."""
    return "tokens" if m.fidelity.get("task", m.source.get("task")) == DECODER_TASK else "texts"


def pareto_axis(metric: str) -> tuple[str, Any]:
    """(label, value -> y) with larger y better, as the Pareto front wants: a ratio where lower is better is
    plotted as its inverse (FP32's perplexity over the candidate's), any other lower-is-better metric negated."""
    from edgecompress.metrics import METRICS

    if metric not in METRICS or METRICS[metric].higher_is_better:
        return metric, float
    if metric == "perplexity_ratio":
        return "1 / perplexity_ratio (higher is better)", lambda v: 1.0 / float(v)
    return f"-{metric} (higher is better)", lambda v: -float(v)


def budget_table(m: Manifest) -> list[str]:
    lines = ["| budget | value | limit | unit | verdict | source |", "|---|---|---|---|---|---|"]
    for r in m.budgets:
        verdict = "PASS" if r.passed else "FAIL"
        value = "–" if r.value is None else _num(r.value)
        lines.append(f"| {r.name} | {value} | {r.comparison} {_num(r.limit)} | {r.unit} | {verdict} | {r.source} |")
    return lines


def render_markdown(m: Manifest) -> str:
    verdict = "within every budget" if m.passed else "**budget failed**: " + "; ".join(
        r.miss() for r in m.failed_budgets)
    out = [
        f"# {m.source['name']} → {m.target['name']} ({m.recipe['name']})",
        "",
        f"Built {m.created} with edgecompress {m.tool.get('edgecompress', '?')}: {verdict}.",
        "",
        "## Budgets",
        "",
        *budget_table(m),
        "",
        "Sources: `measured` = run on this host; `estimated` = roofline from the ONNX graph and the target's "
        "peak figures (see Profile); `measured-on-host` = fidelity computed with this host's kernels.",
        "",
        "## Artifact",
        "",
        f"- file: `{m.artifact.file}` ({m.artifact.size_mb:.2f} MB), sha256 `{m.artifact.sha256}`",
        f"- files in the bundle: {', '.join(f'`{f}`' for f in m.artifact.files)}",
        "",
        "## Recipe",
        "",
        f"`{m.recipe['name']}`: {m.recipe['description']}",
        "",
    ]
    for p in m.recipe["passes"]:
        out.append(f"- **{p['name']}** ({p.get('seconds', 0):.1f} s): config `{p['config']}`")
        for k, v in p["report"].items():
            out.append(f"  - {k}: {v}")
    if not m.recipe["passes"]:
        out.append("- no passes: the FP32 export as is")
    out += kernels_section(m.kernels)
    fid = m.fidelity
    out += ["", "## Fidelity", "",
            f"Against {fid['reference']} on {fid['texts']} {_counted(m)} ({fid['text_source']}); {fid['source']}.",
            "",
            "| metric | value |", "|---|---|"]
    out += [f"| {k} | {_num(v)} |" for k, v in fid["metrics"].items()]
    out += [f"- note: {n}" for n in fid.get("notes", [])]
    exp = m.export
    out += ["", "## Export", "",
            f"optimum {m.tool.get('optimum-onnx', '?')} (opset {exp['opset']}, task `{exp['task']}`), "
            f"{exp['seconds']:.1f} s. Check against PyTorch FP32 on {exp['check']['texts']} {_counted(m)}: max |Δ| "
            f"{exp['check']['max_abs_diff']:.2e} on `{exp['check']['output']}` (tolerance {exp['check']['atol']:g}).",
            "", "## Profile", ""]
    prof = m.profile
    if "kv_cache" in prof:  # decoders
        kv = prof["kv_cache"]
        out += [f"Decoder workload: {_workload(prof)}; KV cache {kv['bytes_per_token']:,} B/token, "
                f"{kv['mb_at_context']:.1f} MB at the {kv['context_length']:,}-token context (in peak RAM).", ""]
    for key in ("host", "device", "estimate"):
        if key in prof:
            section = prof[key]
            out.append(f"### {key} ({section.get('source', '')})")
            out.append("")
            for k, v in section.items():
                if k in ("source", "samples_ms", "ms_by_op_type"):  # plotted in report.html
                    continue
                out.append(f"- {k}: {_num(v) if not isinstance(v, dict) else v}")
            out.append("")
    if m.search:
        out += search_section(m.search)
    if m.warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in m.warnings], ""]
    out += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in m.tool.items()), ""]
    return "\n".join(out)


def _workload(prof: dict[str, Any]) -> str:
    wl = prof.get("workload", {})
    return (f"prompt {wl.get('prompt_length')} tokens, {wl.get('new_tokens')} new tokens, context "
            f"{wl.get('context_length')}")


def kernels_section(k: dict) -> list[str]:
    """Which kernels ORT runs the matrix products with, from its optimized graph (profiling/kernels.py)."""
    if not k:
        return []
    ops = ", ".join(f"{op} ×{v['nodes']} ({v['gflops']:.3f} GFLOP)" for op, v in k["by_op"].items())
    lines = ["", "## Kernels: does it run quantized?", "",
             f"- integer/4-bit kernels run **{k['integer_matmul_flops_share']:.1%}** of MatMul/Gemm FLOPs "
             f"({k['integer_matmul_gflops']:.3f} of {k['matmul_gflops']:.3f} GFLOP at "
             f"{', '.join(f'{d}={v}' for d, v in k['workload'].items())})",
             f"- kernels: {ops or 'none'}",
             f"- fp16 kernels run {k.get('fp16_matmul_flops_share', 0.0):.1%} of MatMul/Gemm FLOPs here (fp16 weights "
             "run as fp32 between casts where the provider lacks fp16 kernels)",
             f"- `{k['optimized_graph']}`: {k['note']} (providers {', '.join(k['providers'])}, "
             f"level {k['graph_optimization_level']})"]
    if k.get("unsized_nodes"):
        lines.append(f"- shapes unknown, counted as 0 FLOPs: {', '.join(k['unsized_nodes'])}")
    return lines


def search_section(search: dict) -> list[str]:
    lines = ["## Recipe search (--recipe auto)", "",
             f"Chosen: **{search['chosen']}** — {search['why']}. Ranked by `{search['metric']}`, then size, then "
             f"latency; {search['seconds']} s.", "",
             "| candidate | status | fidelity | size MB | why |", "|---|---|---|---|---|"]
    for c in search["candidates"]:
        fid = c.get("fidelity", {}).get(search["metric"])
        size = c.get("size_mb")
        why = c.get("why") or c.get("reason", "")
        lines.append(f"| {c['candidate']}{' ✔' if c.get('chosen') else ''} | {c['status']} | "
                     f"{'' if fid is None else f'{fid:.4f}'} | {'' if size is None else f'{size:.2f}'} | {why} |")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------------ report.html

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 60em;
       padding: 0 1em; color: #1b1f24; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: .6em 0; } th, td { border: 1px solid #d0d7de; padding: .25em .6em; }
th { background: #f6f8fa; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
.verdict { padding: .5em .8em; border-radius: 6px; display: inline-block; }
.verdict.ok { background: #dafbe1; } .verdict.bad { background: #ffebe9; }
figure { margin: 1em 0; } figcaption { color: #57606a; font-size: .9em; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
code { background: #f6f8fa; padding: 0 .25em; border-radius: 3px; } .muted { color: #57606a; }
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes | None, alt: str, caption: str, img_id: str) -> list[str]:
    if png is None:
        return []
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return [f'<figure><img id="{_e(img_id)}" alt="{_e(alt)}" src="{uri}">',
            f"<figcaption>{_e(caption)}</figcaption></figure>"]


def _table(header: list[str], rows: list[list[str]], num_cols: frozenset[int] = frozenset(),
           table_id: str = "") -> list[str]:
    """Cells in `rows` are already-escaped HTML."""
    out = [f'<table{f" id={chr(34)}{_e(table_id)}{chr(34)}" if table_id else ""}>',
           "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num_cols else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    return [*out, "</tbody></table>"]


def measured_op_times(profile: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """(section, op type -> ms per run) from an ORT per-op profile (the runner's `ops` table), if one was taken.

    The host section first, then any other measured section (a device over SSH).
    """
    sections = sorted((k for k, v in profile.items() if isinstance(v, dict)), key=lambda k: k != "host")
    for key in sections:
        rows = (profile[key].get("ops") or {}).get("by_op_type") if isinstance(profile[key].get("ops"), dict) \
            else None
        if isinstance(rows, list):
            table = {str(r["op_type"]): float(r["ms_per_run"]) for r in rows
                     if isinstance(r, dict) and "op_type" in r and isinstance(r.get("ms_per_run"), (int, float))}
            if table:
                return key, table
    return None


def _plots(m: Manifest) -> list[str]:
    from edgecompress import plots

    out: list[str] = []
    prof = m.profile
    rows = {r.name: r for r in m.budgets}
    metric = next((k for k in m.fidelity.get("metrics", {})), None)
    base = prof.get("fp32_baseline") or {}
    est = prof.get("estimate") or {}
    host = prof.get("host") or {}
    name = m.recipe["name"]

    # recipe vs the FP32 export: size, fidelity (1 by definition for FP32), latency
    lat_row = rows.get("latency_p90")
    panels = [plots.Panel("size (MB)", [plots.Bar("fp32", base.get("size_mb")),
                                        plots.Bar(name, m.artifact.size_mb)],
                          rows["size"].limit if "size" in rows else None)]
    if metric is not None:
        panels.append(plots.Panel(metric, [plots.Bar("fp32", 1.0, "by definition"),
                                           plots.Bar(name, m.fidelity["metrics"][metric])],
                                  rows[metric].limit if metric in rows else None, zoom=True))
    decoder = "kv_cache" in prof
    panels.append(plots.Panel("decode step (ms)" if decoder else "latency (ms)",
                              [plots.Bar("fp32", base.get("latency_ms"), "estimated"),
                               plots.Bar(name, est.get("latency_ms"), "estimated")],
                              lat_row.limit if lat_row else None))
    how = ("the estimated time of one decode step (bandwidth-bound: weights and KV cache read once per token)"
           if decoder else "roofline-estimated latency at the target's workload")
    out += _img(plots.versus_png(panels, title=f"{name} against the FP32 export on {m.target['name']}"),
                "recipe against FP32", "Size (measured), fidelity (measured on this host; FP32 is the reference, "
                f"so 1) and {how}, both estimated the same way.", "plot-versus")

    samples = host.get("samples_ms") or []
    if samples:
        out += _img(plots.latency_png(samples, budget_ms=lat_row.limit if lat_row else None,
                                      title=f"measured latency on this host ({len(samples)} runs)"),
                    "latency distribution", "Latency per run measured on this host (onnxruntime in a fresh "
                    "process, after warm-up).", "plot-latency")

    measured = measured_op_times(prof)
    if measured:
        where, table = measured
        out += _img(plots.op_breakdown_png(table, title=f"time per op type (measured, ORT profiler, {where})"),
                    "per-op time, measured", f"Per-op-type kernel time per run from onnxruntime's profiler "
                    f"({where}).", "plot-ops")
        op_rows = [r for r in prof[where]["ops"]["by_op_type"]
                   if isinstance(r, dict) and isinstance(r.get("ms_per_run"), (int, float))]
        out += _table(["op type", "ms per run", "share", "nodes", "providers"],
                      [[_e(r["op_type"]), f"{r['ms_per_run']:.3f}", f"{100 * r.get('share', 0):.1f}%",
                        _e(r.get("nodes", "")), _e(", ".join(r.get("providers", [])))] for r in op_rows[:15]],
                      frozenset({1, 2, 3}), "ops")
    elif est.get("ms_by_op_type"):
        out += _img(plots.op_breakdown_png(est["ms_by_op_type"],
                                           title=f"time per op type (ESTIMATED, roofline on {m.target['name']})"),
                    "per-op time, estimated", "Estimated: the per-node roofline summed by op type; not a "
                    "measurement.", "plot-ops")

    if m.search:
        s = m.search
        ylabel, y = pareto_axis(s["metric"])
        points = [plots.ParetoPoint(str(c["candidate"]), float(c["size_mb"]), y(c["fidelity"][s["metric"]]),
                                    bool(c.get("passed")))
                  for c in s["candidates"] if c.get("status") == "built" and c.get("size_mb") is not None
                  and (c.get("fidelity") or {}).get(s["metric"]) is not None]
        out += _img(plots.pareto_png(points, f"{m.target['name']}: candidates, size vs fidelity "
                                             "(green: within budgets)", ylabel),
                    "Pareto front of the search", "Every candidate the search built; circles are on the "
                    "Pareto front (joined), green ones are within every budget.", "plot-pareto")
    return out


def render_html(m: Manifest) -> str:
    """report.html: the same facts as report.md, with plots; self-contained."""
    title = f"{m.source['name']} → {m.target['name']} ({m.recipe['name']})"
    if m.passed:
        verdict = '<p class="verdict ok">Within every budget.</p>'
    else:
        verdict = ('<p class="verdict bad">Budget failed: '
                   + "; ".join(_e(r.miss()) for r in m.failed_budgets) + "</p>")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_e(title)}</h1>",
           f'<p class="muted">Built {_e(m.created)} with edgecompress {_e(m.tool.get("edgecompress", "?"))}.</p>',
           verdict, "<h2>Budgets</h2>"]
    budget_rows = [[_e(r.name), "–" if r.value is None else _e(_num(r.value)), f"{_e(r.comparison)} "
                    f"{_e(_num(r.limit))}", _e(r.unit),
                    '<span class="pass">PASS</span>' if r.passed else '<span class="fail">FAIL</span>',
                    _e(r.source) + (f" ({_e(r.note)})" if r.note else "")] for r in m.budgets]
    out += _table(["budget", "value", "limit", "unit", "verdict", "source"], budget_rows, frozenset({1, 2}),
                  "budgets")
    out.append('<p class="muted">Sources: <code>measured</code> = run on this host; <code>estimated</code> = '
               "roofline from the ONNX graph and the target's peak figures; <code>measured-on-host</code> = "
               "fidelity computed with this host's kernels (int8 results on Arm can differ: "
               "<code>edgecompress emulator run</code>).</p>")
    out += ["<h2>Plots</h2>", *_plots(m)]

    out += ["<h2>Artifact</h2>", "<ul>",
            f"<li>file: <code>{_e(m.artifact.file)}</code> ({m.artifact.size_mb:.2f} MB), sha256 "
            f"<code>{_e(m.artifact.sha256)}</code></li>",
            f"<li>files in the bundle: {', '.join(f'<code>{_e(f)}</code>' for f in m.artifact.files)}</li>", "</ul>"]

    out += ["<h2>Recipe</h2>", f"<p><code>{_e(m.recipe['name'])}</code>: {_e(m.recipe.get('description', ''))}</p>"]
    pass_rows = [[_e(p["name"]), _e(f"{p.get('seconds', 0):.1f}"), f"<code>{_e(p['config'])}</code>",
                  "<br>".join(f"{_e(k)}: {_e(v)}" for k, v in p["report"].items())] for p in m.recipe["passes"]]
    out += (_table(["pass", "seconds", "config", "report"], pass_rows, frozenset({1}), "passes") if pass_rows
            else ["<p>No passes: the FP32 export as is.</p>"])

    fid = m.fidelity
    out += ["<h2>Fidelity</h2>",
            f"<p>Against {_e(fid['reference'])} on {_e(fid['texts'])} {_counted(m)} ({_e(fid['text_source'])}); "
            f"{_e(fid['source'])}.</p>"]
    out += _table(["metric", "value"], [[_e(k), _e(_num(v))] for k, v in fid["metrics"].items()], frozenset({1}),
                  "fidelity")
    out += [f"<p>note: {_e(n)}</p>" for n in fid.get("notes", [])]

    out.append("<h2>Profile</h2>")
    if "kv_cache" in m.profile:  # decoders
        kv = m.profile["kv_cache"]
        out.append(f"<p>Decoder workload: {_e(_workload(m.profile))}; KV cache {kv['bytes_per_token']:,} B/token, "
                   f"{kv['mb_at_context']:.1f} MB at the {kv['context_length']:,}-token context (in peak RAM).</p>")
    for key in ("host", "device", "estimate"):
        section = m.profile.get(key)
        if not section:
            continue
        items = [[_e(k), _e(_num(v) if not isinstance(v, dict) else v)] for k, v in section.items()
                 if k not in ("source", "samples_ms", "ms_by_op_type", "ops")]
        out += [f"<h3>{_e(key)} ({_e(section.get('source', ''))})</h3>", *_table(["figure", "value"], items)]

    if m.search:
        s = m.search
        out += ["<h2>Recipe search (--recipe auto)</h2>",
                f"<p>Chosen: <strong>{_e(s['chosen'])}</strong> — {_e(s['why'])}. Ranked by "
                f"<code>{_e(s['metric'])}</code>, then size, then latency; {_e(s['seconds'])} s.</p>"]
        cand_rows = []
        for c in s["candidates"]:
            f = (c.get("fidelity") or {}).get(s["metric"])
            size = c.get("size_mb")
            cand_rows.append([_e(c["candidate"]) + (" ✔" if c.get("chosen") else ""), _e(c["status"]),
                              "" if f is None else f"{f:.4f}", "" if size is None else f"{size:.2f}",
                              _e(c.get("why") or c.get("reason", ""))])
        out += _table(["candidate", "status", "fidelity", "size MB", "why"], cand_rows, frozenset({2, 3}),
                      "candidates")
    if m.warnings:
        out += ["<h2>Warnings</h2>", "<ul>", *[f"<li>{_e(w)}</li>" for w in m.warnings], "</ul>"]
    out += ["<h2>Versions</h2>", f"<p>{_e(', '.join(f'{k} {v}' for k, v in m.tool.items()))}</p>",
            "</body></html>", ""]
    return "\n".join(out)
