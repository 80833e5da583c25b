"""report.md: the human-readable side of manifest.json."""

from __future__ import annotations

from edgecompress.manifest import Manifest


def _num(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


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
    fid = m.fidelity
    out += ["", "## Fidelity", "",
            f"Against {fid['reference']} on {fid['texts']} texts ({fid['text_source']}); {fid['source']}.", "",
            "| metric | value |", "|---|---|"]
    out += [f"| {k} | {_num(v)} |" for k, v in fid["metrics"].items()]
    out += [f"- note: {n}" for n in fid.get("notes", [])]
    exp = m.export
    out += ["", "## Export", "",
            f"optimum {m.tool.get('optimum-onnx', '?')} (opset {exp['opset']}, task `{exp['task']}`), "
            f"{exp['seconds']:.1f} s. Check against PyTorch FP32 on {exp['check']['texts']} texts: max |Δ| "
            f"{exp['check']['max_abs_diff']:.2e} on `{exp['check']['output']}` (tolerance {exp['check']['atol']:g}).",
            "", "## Profile", ""]
    prof = m.profile
    for key in ("host", "estimate"):
        if key in prof:
            section = prof[key]
            out.append(f"### {key} ({section.get('source', '')})")
            out.append("")
            for k, v in section.items():
                if k in ("source", "samples_ms"):
                    continue
                out.append(f"- {k}: {_num(v) if not isinstance(v, dict) else v}")
            out.append("")
    if m.search:
        out += search_section(m.search)
    if m.warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in m.warnings], ""]
    out += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in m.tool.items()), ""]
    return "\n".join(out)


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
