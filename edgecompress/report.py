"""report.md and report.html: the human-readable sides of manifest.json.

report.html is one self-contained file (plots as base64 PNG data URIs, no scripts, no outside requests) that is
a pure function of the manifest; everything taken from the manifest is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from edgecompress import taskspec
from edgecompress.manifest import Manifest
from edgecompress.profiling.workload import DECODER, recorded_kind


def _num(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


def _counted(m: Manifest) -> str:
    """What fidelity and the export check count, as the build recorded it (the task adapter's `units` fact: a
    decoder is judged per predicted token, an encoder per text); bundles built before it was recorded: tokens for
    a decoder workload, else texts."""
    counted = m.fidelity.get("counted")
    if isinstance(counted, str):
        return counted
    return "tokens" if recorded_kind({"profile": m.profile}) == DECODER else "texts"


def pareto_axis(metric: str) -> tuple[str, Any]:
    """(label, value -> y) with larger y better, as the Pareto front wants: a ratio where lower is better is
    plotted as its inverse (FP32's perplexity over the candidate's), any other lower-is-better metric negated."""
    from edgecompress.taskspec import METRICS

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
    out += mobile_section((m.bundle or {}).get("ort_mobile") or {})
    snippets = load_snippets(m)
    if snippets:
        out += ["", "## Load this bundle", ""]
        for what, code in snippets:
            out += [f"{what}:", "", "```python", code, "```", ""]
    fid = m.fidelity
    out += ["", "## Fidelity", "",
            f"Against {fid['reference']} on {fid['texts']} {_counted(m)} ({fid['text_source']}); {fid['source']}.",
            "",
            "| metric | value |", "|---|---|"]
    out += [f"| {k} | {_num(v)} |" for k, v in fid["metrics"].items()]
    out += [f"- note: {n}" for n in fid.get("notes", [])]
    per = fid.get("per_text") or {}
    speech = bool(per.get("examples")) and "clip" in per["examples"][0]
    if speech:
        out += ["", "Example transcripts (FP32 → compressed):", ""]
        out += [f"- {x['clip']}: `{x['fp32']}` → `{x['compressed']}`" for x in per["examples"]]
    if per.get("worst"):
        out += ["", f"Worst texts ({per['metric']}):", ""]
        out += [f"- {w[per['metric']]:.4f}: {w['text']}" for w in per["worst"]]
    if per.get("examples") and not speech:  # image models: FP32 vs compressed top-1 on a few images
        out += ["", "Example images (FP32 → compressed top-1, probability):", ""]
        out += [f"- {ex['image']}: {ex['reference']} ({ex['reference_p']:.2f}) → {ex['candidate']} "
                f"({ex['candidate_p']:.2f})" + (f"; label {ex['label']}" if "label" in ex else "")
                for ex in per["examples"]]
    exp = m.export
    out += ["", "## Export", "",
            (f"ORT GenAI's model builder ({exp['graph'].get('builder', '?')}; the decoder fast path: "
             f"{exp['graph'].get('nodes', '?')} nodes, GroupQueryAttention)" if exp.get("path") == "fast"
             else f"optimum {m.tool.get('optimum-onnx', '?')}" + (f" (fallback: {exp['path_why']})"
                                                                   if exp.get("path") == "fallback" else ""))
            + f" (opset {exp['opset']}, task `{exp['task']}`), "
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
    """Which kernels ORT runs the matrix products with: the target's figure, and this host's beside it."""
    if not k:
        return []
    lines = ["", "## Kernels: does it run quantized?", ""]
    for label, sec in kernel_views(k):
        ops = ", ".join(f"{op} ×{v['nodes']} ({v['gflops']:.3f} GFLOP)" for op, v in sec["by_op"].items())
        lines += [f"- **{label}** ({sec.get('source', 'measured-on-host')}; {sec.get('machine', '')}): integer/4-bit "
                  f"kernels run **{sec['integer_matmul_flops_share']:.1%}** of MatMul/Gemm FLOPs "
                  f"({sec['integer_matmul_gflops']:.3f} of {sec['matmul_gflops']:.3f} GFLOP at "
                  f"{', '.join(f'{d}={v}' for d, v in sec['workload'].items())}); kernels: {ops or 'none'}"]
        if sec.get("whose"):
            lines.append(f"  - whose: {sec['whose']}")
        if sec.get("method"):
            lines.append(f"  - model: {sec['method']} (`profiling/fusion.py`)")
        if sec.get("optimized_graph"):
            lines.append(f"  - `{sec['optimized_graph']}`: {sec.get('note', 'ORT optimized graph')}")
        if sec.get("unsized_nodes"):
            lines.append(f"  - shapes unknown, counted as 0 FLOPs: {', '.join(sec['unsized_nodes'])}")
    return lines


def kernel_views(k: dict) -> list[tuple[str, dict]]:
    """[(label, figures)]: the target's first, then this host's when the target is another machine."""
    if "host" in k:
        return [(f"target {k.get('target', '')}".strip(), k), ("this host", k["host"])]
    return [("this host (the target)", k)]


def load_snippets(m: Manifest) -> list[tuple[str, str]]:
    """[(what, code)]: how to load this bundle in the clients it was made for."""
    task = m.source.get("task")
    bundle = m.bundle or {}
    d = m.bundle_dir or "path/to/bundle"
    out: list[tuple[str, str]] = []
    if bundle.get("sentence_transformers"):
        out.append(("sentence-transformers (its pooling, normalisation and max length come with the bundle)",
                    f'from sentence_transformers import SentenceTransformer\n'
                    f'model = SentenceTransformer("{d}", backend="onnx")\n'
                    f'vectors = model.encode(["first text", "second text"])'))
    if task == "feature-extraction":
        out.append(("onnxruntime + tokenizers only (no torch)",
                    f'import numpy as np, onnxruntime as ort\nfrom tokenizers import Tokenizer\n'
                    f'tok = Tokenizer.from_file("{d}/tokenizer.json")\n'
                    f'sess = ort.InferenceSession("{d}/model.onnx")\n'
                    f'enc = tok.encode("some text")\n'
                    f'feed = {{"input_ids": np.array([enc.ids]), "attention_mask": np.array([enc.attention_mask]),\n'
                    f'        "token_type_ids": np.array([enc.type_ids])}}  # only the inputs the model has\n'
                    f'hidden = sess.run(None, {{i.name: feed[i.name] for i in sess.get_inputs()}})[0]\n'
                    f'mask = feed["attention_mask"][..., None]  # mean pooling + Normalize (modules.json)\n'
                    f'vec = (hidden * mask).sum(1) / mask.sum(1)\n'
                    f'vec /= np.linalg.norm(vec, axis=1, keepdims=True)'))
    elif task == "text-classification":
        out.append(("optimum", f'from optimum.onnxruntime import ORTModelForSequenceClassification\n'
                               f'model = ORTModelForSequenceClassification.from_pretrained("{d}")'))
    elif (spec := taskspec.spec(str(task))) is not None and spec.modality == "image":
        out.append(("onnxruntime + the bundle's image processor (transformers' AutoImageProcessor, no torch)",
                    f'import numpy as np, onnxruntime as ort\nfrom PIL import Image\n'
                    f'from transformers import AutoImageProcessor\n'
                    f'proc = AutoImageProcessor.from_pretrained("{d}")\n'
                    f'sess = ort.InferenceSession("{d}/model.onnx")\n'
                    f'image = Image.open("photo.jpg").convert("RGB")\n'
                    f'pixels = proc(images=[image], return_tensors="np")["pixel_values"]\n'
                    f'logits = sess.run(None, {{sess.get_inputs()[0].name: pixels.astype(np.float32)}})[0]\n'
                    f'print(logits.argmax(-1))  # config.json id2label names the classes'))
    elif recorded_kind({"profile": m.profile}) == DECODER:  # a causal LM
        out.append(("optimum + the chat template in the bundle",
                    f'from optimum.onnxruntime import ORTModelForCausalLM\n'
                    f'from transformers import AutoTokenizer\n'
                    f'tok = AutoTokenizer.from_pretrained("{d}")\n'
                    f'model = ORTModelForCausalLM.from_pretrained("{d}")  # generation_config.json comes along\n'
                    f'chat = [{{"role": "user", "content": "Hi"}}]\n'
                    f'ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")\n'
                    f'print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))'))
    if bundle.get("ort_mobile"):
        out.append(("ORT Mobile (the app's runtime): the same API on the .ort file",
                    f'sess = ort.InferenceSession("{d}/model.ort")'))
    return out


def mobile_section(mob: dict) -> list[str]:
    if not mob:
        return []
    lines = ["", "## ORT Mobile package", "",
             f"- `{mob['file']}` ({mob['size_bytes'] / 1e6:.2f} MB, the size budgeted), made by {mob['converter']}",
             f"- reduced-operator config `{mob['required_operators_and_types']}`: "
             + "; ".join(f"{dom}: {', '.join(ops)}" for dom, ops in mob["operators"].items()),
             f"- loads in onnxruntime: {mob['check']['loads']}; against model.onnx on this host: max |Δ| "
             f"{mob['check']['max_abs_diff_vs_onnx']:.3g}, min row cosine {mob['check']['cosine_min_vs_onnx']:.4f}; "
             f"against the graph it serializes: max |Δ| {mob['check'].get('max_abs_diff_vs_optimized_onnx', '–')}",
             f"- ORT's usability report: `{mob['usability_report']}`", "",
             "| provider | nodes it takes | partitions | falls back to CPU |", "|---|---|---|---|"]
    for ep, r in mob["providers"].items():
        if r.get("assessed"):
            fb = ", ".join(f"{op} ×{n}" for op, n in list(r["cpu_fallback_nodes"].items())[:8])
            lines.append(f"| {ep} | {r['supported_nodes']}/{r['nodes']} ({r['node_share']:.1%}) | {r['partitions']} "
                         f"| {fb} |")
        else:
            cm = ", ".join(f"{op} ×{n}" for op, n in r.get("com_microsoft_nodes", {}).items()) or "none"
            lines.append(f"| {ep} | not assessed (no ORT checker) | – | com.microsoft nodes (CPU only): {cm} |")
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
pre.snippet { background: #f6f8fa; padding: .6em .8em; border-radius: 6px; overflow-x: auto; }
pre.snippet code { padding: 0; } td { vertical-align: top; }
#layers { font-size: .85em; } #layers td:first-child { word-break: break-all; }
.kind { font-size: .8em; font-weight: 600; text-transform: uppercase; padding: 0 .4em; border-radius: 3px; }
.kind.measured { background: #dafbe1; color: #1a7f37; } .kind.estimated { background: #fff8c5; color: #9a6700; }
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes | None, alt: str, caption: str, img_id: str, kind: str) -> list[str]:
    """A figure whose caption starts with what its numbers are: measured, estimated, or which part is which."""
    if png is None:
        return []
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return [f'<figure><img id="{_e(img_id)}" alt="{_e(alt)} ({_e(kind)})" src="{uri}">',
            f'<figcaption><span class="kind {"estimated" if "estimated" in kind else "measured"}">{_e(kind)}'
            f"</span> {_e(caption)}</figcaption></figure>"]


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
    panels = [plots.Panel("size (MB), measured", [plots.Bar("fp32", base.get("size_mb")),
                                        plots.Bar(name, m.artifact.size_mb)],
                          rows["size"].limit if "size" in rows else None)]
    if metric is not None:
        panels.append(plots.Panel(f"{metric}, measured", [plots.Bar("fp32", 1.0, "by definition"),
                                           plots.Bar(name, m.fidelity["metrics"][metric])],
                                  rows[metric].limit if metric in rows else None, zoom=True))
    decoder = "kv_cache" in prof
    panels.append(plots.Panel("decode step (ms), ESTIMATED" if decoder else "latency (ms), ESTIMATED",
                              [plots.Bar("fp32", base.get("latency_ms"), "estimated"),
                               plots.Bar(name, est.get("latency_ms"), "estimated")],
                              lat_row.limit if lat_row else None))
    how = ("the estimated time of one decode step (bandwidth-bound: weights and KV cache read once per token)"
           if decoder else "roofline-estimated latency at the target's workload")
    out += _img(plots.versus_png(panels, title=f"{name} against the FP32 export on {m.target['name']}"),
                "recipe against FP32", "Size (measured), fidelity (measured on this host; FP32 is the reference, "
                f"so 1) and {how}, both estimated the same way.", "plot-versus",
                "measured size and fidelity; estimated latency")

    samples = host.get("samples_ms") or []
    if samples:
        out += _img(plots.latency_png(samples, budget_ms=lat_row.limit if lat_row else None,
                                      title=f"measured latency on this host ({len(samples)} runs)"),
                    "latency distribution", "Latency per run measured on this host (onnxruntime in a fresh "
                    "process, after warm-up).", "plot-latency", "measured")

    measured = measured_op_times(prof)
    if measured:
        where, table = measured
        out += _img(plots.op_breakdown_png(table, title=f"time per op type (measured, ORT profiler, {where})"),
                    "per-op time, measured", f"Per-op-type kernel time per run from onnxruntime's profiler "
                    f"({where}).", "plot-ops", "measured")
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
                    "measurement.", "plot-ops", "estimated")

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
                    "Pareto front (joined), green ones are within every budget.", "plot-pareto",
                    "measured size and fidelity")
    return out


_SKIP_WORDS = ("skip",)


def pass_rows(p: dict[str, Any]) -> tuple[str, str]:
    """(what the pass did, what it skipped and why) as readable lines from its JSON report."""
    did: list[str] = []
    skipped: list[str] = []
    for k, v in p.get("report", {}).items():
        text = _short(v)
        (skipped if any(w in k for w in _SKIP_WORDS) else did).append(f"{k}: {text}")
    return "\n".join(did), "\n".join(skipped) or "nothing"


def _short(v: Any, limit: int = 160) -> str:
    if isinstance(v, list):
        if v and all(isinstance(x, dict) for x in v):
            names = [str(x.get("node") or x.get("name") or x.get("tensor") or "") for x in v]
            return f"{len(v)}: " + ", ".join(n for n in names[:4] if n) + (" …" if len(v) > 4 else "")
        text = ", ".join(str(x) for x in v)
    elif isinstance(v, dict):
        text = ", ".join(f"{k}={_short(x, 40)}" for k, x in v.items() if not isinstance(x, (list, dict)))
    elif isinstance(v, float):
        text = _num(v)
    else:
        text = str(v)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _lines(text: str) -> str:
    return "<br>".join(_e(x) for x in text.split("\n"))


def render_html(m: Manifest) -> str:
    """report.html: the verdict first, then what a person needs to trust and use the bundle; self-contained."""
    title = f"{m.source['name']} → {m.target['name']} ({m.recipe['name']})"
    if m.passed:
        verdict = '<p class="verdict ok" id="verdict">Within every budget.</p>'
    else:
        verdict = ('<p class="verdict bad" id="verdict">Budget failed: '
                   + "; ".join(_e(r.miss()) for r in m.failed_budgets) + "</p>")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_e(title)}</h1>", verdict,
           f'<p class="muted">Built {_e(m.created)} with edgecompress {_e(m.tool.get("edgecompress", "?"))}; '
           f'{_e(m.artifact.file)} {m.artifact.size_mb:.2f} MB.</p>', "<h2>Budgets</h2>"]
    budget_rows = [[_e(r.name), "–" if r.value is None else _e(_num(r.value)), f"{_e(r.comparison)} "
                    f"{_e(_num(r.limit))}", _e(r.unit),
                    '<span class="pass">PASS</span>' if r.passed else '<span class="fail">FAIL</span>',
                    _e(r.source) + (f" ({_e(r.note)})" if r.note else "")] for r in m.budgets]
    out += _table(["budget", "value", "limit", "unit", "verdict", "source"], budget_rows, frozenset({1, 2}),
                  "budgets")
    out.append('<p class="muted">Sources: <code>measured</code> = run on this host; <code>estimated</code> = '
               "roofline from the ONNX graph and the target's peak figures; <code>measured-on-host</code> = "
               "fidelity computed with this host's kernels (int8 results on Arm can differ: "
               "<code>edgecompress profile --emulate</code>).</p>")

    snippets = load_snippets(m)
    if snippets:
        out.append('<h2 id="load">Load this bundle</h2>')
        for what, code in snippets:
            out += [f"<p>{_e(what)}:</p>", f'<pre class="snippet"><code>{_e(code)}</code></pre>']

    out += _kernels_html(m.kernels)
    out += _mobile_html((m.bundle or {}).get("ort_mobile") or {})
    out += _export_html(m)

    out += ["<h2>Recipe</h2>", f"<p><code>{_e(m.recipe['name'])}</code>: {_e(m.recipe.get('description', ''))}</p>"]
    rows = []
    for p in m.recipe["passes"]:
        did, skipped = pass_rows(p)
        rows.append([f"<strong>{_e(p['name'])}</strong>", _lines(did), _lines(skipped),
                     _e(f"{p.get('seconds', 0):.1f}"), f"<code>{_e(_short(p['config'], 300))}</code>"])
    out += (_table(["pass", "what it did", "skipped, and why", "seconds", "config"], rows, frozenset({3}), "passes")
            if rows else ["<p>No passes: the FP32 export as is.</p>"])
    layers = m.recipe.get("layers") or []
    if layers:
        out += ["<h3>Per layer</h3>",
                f'<p class="muted">{len(layers)} nodes that read a constant weight, from the deployable graph; '
                "sensitivity is the measured output change when that node alone is quantized (where the recipe "
                "measured it).</p>"]
        out += _table(["node", "op", "weight", "precision", "bits", "activations", "kept float, why", "sensitivity"],
                      [[_e(r["node"]), _e(r["op"]), _e("×".join(str(d) for d in r["weight"])), _e(r["precision"]),
                        _e(r["bits"]), _e(r["activations"]), _e(r.get("kept_float", "")),
                        "" if r.get("sensitivity") is None else f"{r['sensitivity']:.4g}"] for r in layers],
                      frozenset({4, 7}), "layers")

    out += _fidelity_html(m)
    out += ["<h2>Plots</h2>", *_plots(m)]

    out += ["<h2>Artifact</h2>", "<ul>",
            f"<li>file: <code>{_e(m.artifact.file)}</code> ({m.artifact.size_mb:.2f} MB), sha256 "
            f"<code>{_e(m.artifact.sha256)}</code></li>",
            f"<li>files in the bundle: {', '.join(f'<code>{_e(f)}</code>' for f in m.artifact.files)}</li>", "</ul>"]

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


def _kernels_html(k: dict) -> list[str]:
    if not k:
        return []
    rows = []
    for label, sec in kernel_views(k):
        ops = ", ".join(f"{op} ×{v['nodes']} ({v['gflops']:.3f} GFLOP)" for op, v in sec["by_op"].items())
        rows.append([f"<strong>{_e(label)}</strong>", _e(sec.get("source", "measured-on-host")),
                     _e(sec.get("machine", "")), f"{sec['integer_matmul_flops_share']:.1%}", _e(ops or "none"),
                     _e(sec.get("whose", "")) + (f"<br><span class=muted>{_e(sec['method'])}</span>"
                                                 if sec.get("method") else "")
                     + (f"<br><code>{_e(sec['optimized_graph'])}</code>" if sec.get("optimized_graph") else "")])
    return ["<h2>Kernels: does it run quantized?</h2>",
            "<p>Share of MatMul/Gemm FLOPs that run in integer or 4-bit kernels in the graph ONNX Runtime optimizes "
            "at load. The first row is the target's: measured here for a host target, <code>emulated</code> "
            "(aarch64 ORT under qemu) or <code>modelled</code> (what Arm builds of ORT fuse) otherwise; this "
            "host's own figure is beside it.</p>",
            *_table(["whose", "source", "machine", "integer share", "kernels", "how"], rows, frozenset({3}),
                    "kernels")]


def _mobile_html(mob: dict) -> list[str]:
    if not mob:
        return []
    chk = mob["check"]
    out = ["<h2>ORT Mobile package</h2>", "<ul>",
           f"<li><code>{_e(mob['file'])}</code>: {mob['size_bytes'] / 1e6:.2f} MB (the size budgeted: the app "
           f"ships it), made by {_e(mob['converter'])}</li>",
           f"<li>reduced-operator config <code>{_e(mob['required_operators_and_types'])}</code> (for ORT's "
           "<code>build.py --include_ops_by_config</code>): "
           + "; ".join(f"{_e(d)}: {_e(', '.join(ops))}" for d, ops in mob["operators"].items()) + "</li>",
           f"<li>loads in onnxruntime: {_e(chk['loads'])}; against <code>model.onnx</code> on this host: max |Δ| "
           f"{chk['max_abs_diff_vs_onnx']:.3g}, min row cosine {chk['cosine_min_vs_onnx']:.4f}; against the graph it "
           f"serializes: max |Δ| {_e(chk.get('max_abs_diff_vs_optimized_onnx', '–'))}</li>",
           f"<li>ORT's mobile usability report: <code>{_e(mob['usability_report'])}</code></li>", "</ul>"]
    rows = []
    for ep, r in mob["providers"].items():
        if r.get("assessed"):
            fb = ", ".join(f"{op} ×{n}" for op, n in r["cpu_fallback_nodes"].items())
            rows.append([_e(ep), f"{r['supported_nodes']}/{r['nodes']} ({r['node_share']:.1%})", _e(r["partitions"]),
                         _e(r["suitability"]), _e(fb)])
        else:
            cm = ", ".join(f"{op} ×{n}" for op, n in r.get("com_microsoft_nodes", {}).items()) or "none"
            rows.append([_e(ep), "not assessed", "–", "–", _e(f"no ORT checker; com.microsoft nodes run on CPU: {cm}")])
    return [*out, *_table(["provider", "nodes it takes (ORT's checker)", "partitions", "ORT's verdict",
                           "falls back to the CPU provider"], rows, frozenset({1, 2}), "providers")]


def _export_html(m: Manifest) -> list[str]:
    exp = m.export
    chk = exp.get("check", {})
    rows = [["exporter", _e(exp.get("exporter", "optimum"))], ["optimum-onnx", _e(m.tool.get("optimum-onnx", "?"))],
            ["task", _e(exp.get("task"))], ["opset", _e(exp.get("opset"))],
            ["seconds", _e(f"{exp.get('seconds', 0):.1f}")], ["cached", _e(exp.get("cached", False))],
            ["check against", _e(chk.get("reference", "PyTorch FP32"))],
            ["checked on", _e(f"{chk.get('texts')} {_counted(m)} on {chk.get('output')}")],
            ["max |Δ|", _e(f"{chk.get('max_abs_diff', 0):.2e} (tolerance {chk.get('atol', 0):g})")]]
    return ["<h2>Export</h2>", *_table(["what", "value"], rows, table_id="export")]


def _fidelity_html(m: Manifest) -> list[str]:
    fid = m.fidelity
    out = ["<h2>Fidelity</h2>",
           f"<p>Against {_e(fid['reference'])} on {_e(fid['texts'])} {_counted(m)} ({_e(fid['text_source'])}); "
           f"{_e(fid['source'])}.</p>"]
    out += _table(["metric", "value"], [[_e(k), _e(_num(v))] for k, v in fid["metrics"].items()], frozenset({1}),
                  "fidelity")
    out += [f"<p>note: {_e(n)}</p>" for n in fid.get("notes", [])]
    per = fid.get("per_text") or {}
    if per.get("values"):
        from edgecompress import plots

        metric = per["metric"]
        floor = next((r.limit for r in m.budgets if r.name == f"{metric}_mean"), None)
        out += _img(plots.per_text_png(per["values"], metric=metric, floor=floor,
                                       title=f"{metric} of each evaluation text against the reference (measured)"),
                    f"{metric} per text", f"Each of the {len(per['values'])} evaluation texts, on this host's "
                    "kernels.", "plot-per-text", "measured")
        out += ["<h3>Worst texts</h3>",
                *_table(["text", metric], [[_e(w["text"]), f"{w[metric]:.4f}"] for w in per.get("worst", [])],
                        frozenset({1}), "worst-texts")]
    examples = per.get("examples") or []
    if examples and "clip" in examples[0]:  # speech: a few clips' transcripts, FP32 beside the compressed model's
        return [*out, f"<h3>Example transcripts</h3><p>{_e(per.get('identical', '?'))} of {_e(fid['texts'])} "
                      "transcripts identical to FP32's.</p>",
                      *_table(["clip", "FP32", "compressed", "reference"],
                              [[_e(x["clip"]), _e(x["fp32"]), _e(x["compressed"]), _e(x.get("reference", ""))]
                               for x in examples], table_id="transcripts")]
    return out + _examples_html(examples)


def _examples_html(examples: list[dict[str, Any]]) -> list[str]:
    """Image models: a few evaluation images with the reference's and the compressed model's top-1 (tasks/vision.py)."""
    if not examples:
        return []
    rows = []
    for ex in examples:
        same = ex["reference"] == ex["candidate"]
        rows.append([f'<img src="{_e(ex["thumbnail"])}" alt="{_e(ex["image"])}" width="96"><br>{_e(ex["image"])}',
                     _e(ex.get("label", "–")), f'{_e(ex["reference"])} ({ex["reference_p"]:.2f})',
                     f'{_e(ex["candidate"])} ({ex["candidate_p"]:.2f})' + ("" if same else " <b>differs</b>"),
                     f'{ex["kl"]:.4f}'])
    return ["<h3>Example images: FP32 vs compressed predictions</h3>",
            "<p>Disagreements first, then the first images; top-1 class and its probability.</p>",
            *_table(["image", "label", "FP32", "compressed", "KL"], rows, frozenset({4}), "examples")]
