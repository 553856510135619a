"""The text report of a bench result: header, models, latency, agreement, skipped rows, notes."""
from __future__ import annotations

import math

from .. import units


def _fmt(v, spec: str, none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _fmt_ms(v) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def _times(v) -> str:
    return _fmt(v, ".2f") + ("x" if v is not None else "")


def _pct(v) -> str:
    return _fmt(v * 100 if v is not None else None, ".2f") + ("%" if v is not None else "")


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _header(result: dict) -> list[str]:
    s, env, src = result["settings"], result["environment"], result["inputs"]
    threads = s["threads"] if s["threads"] else "default"
    what = (f"{src['num_samples']} samples of {src['data']}" if src["source"] == "data"
            else f"{src['num_samples']} random samples (seed {s['seed']})")
    return [f"onnxrep bench {result['tool']['version']}: onnxruntime {env['onnxruntime']}, {env['cpu']} "
            f"({env['cpu_count']} cpus), graph optimizations: {s['ort_opt']}, threads: {threads}",
            f"timing: {s['warmup']} warm-up + {s['runs']} timed runs per model, interleaved round-robin; "
            f"agreement on {what}", ""]


def _models(result: dict) -> list[str]:
    rows = []
    for m in result["models"]:
        rows.append([str(m["index"]), m["name"], str(m["nodes"]), units.count(m["params"]),
                     units.count(m.get("macs")), units.nbytes(m["size_bytes"]),
                     "dynamic" if m["static_batch"] is None else str(m["static_batch"])])
        i8 = m["int8"]
        if i8 is not None:
            ok = i8["status"] == "ok"
            rows.append(["", "  int8 (QDQ)" if ok else "  int8", str(i8["nodes"]) if ok else "", "", "",
                         units.nbytes(i8["size_bytes"]) if ok else "", ""])
    return _table(["#", "model", "nodes", "params", "MACs", "size", "batch"], rows, {0, 2, 3, 4, 5}) + [""]


def _latency(result: dict, ok_prov: list[str], skipped: list[str], skipped_variants: set) -> list[str]:
    int8 = result["settings"]["int8"] is not None
    rows = []
    for r in result["latency"]:
        if r["provider"] not in ok_prov:
            continue
        if r["status"] != "ok":
            skipped.append(f"{r['provider']} batch {r['batch']} {r['model_name']} {r['precision']}: {r['reason']}")
            skipped_variants.add((r["provider"], r["model"], r["precision"]))
            continue
        row = [r["provider"], str(r["batch"]), r["model_name"], r["precision"], _fmt_ms(r["median_ms"]),
               _fmt_ms(r["p90_ms"]), _fmt_ms(r["min_ms"]), _fmt(r["throughput_per_s"], ".1f"), _times(r["speedup_vs_first"])]
        rows.append(row + ([_times(r["speedup_vs_fp32"])] if int8 else []))
    if not rows:
        return []
    headers = ["provider", "batch", "model", "prec", "median ms", "p90 ms", "min ms", "samples/s", "speedup"]
    out = ["latency (speedup: median of the first model / median of this one)"]
    out += _table(headers + (["vs fp32"] if int8 else []), rows, {1, 4, 5, 6, 7, 8, 9})
    if any(r["status"] == "ok" and r["p90_ms"] and r["median_ms"] and r["p90_ms"] > 1.5 * r["median_ms"]
           for r in result["latency"]):
        out.append("note: p90 > 1.5x median on some rows: the machine was noisy; more --runs or fewer --threads may help")
    return out + [""]


def not_compared(q: dict) -> str | None:
    """Why a quality row has no agreement figures (whole row or some outputs), else None."""
    if q["reference"] is None:
        return None
    a = q["agreement"]
    if a is None:
        return q["agreement_reason"] or "not computed"
    problems = [o["problem"] for o in a.get("outputs", []) if o.get("problem")]
    return "; ".join(problems) or None


def _quality_row(result: dict, q: dict, has_acc: bool) -> list[str]:
    ref = q["reference"]
    vs = "(reference)" if ref is None else f"{result['models'][ref['model']]['name']} {ref['precision']}"
    a = q["agreement"] or {}
    row = [q["provider"], q["model_name"], q["precision"], vs, _fmt(a.get("max_abs_err"), ".2e"),
           _fmt(a.get("rel_err"), ".2e"), _fmt(a.get("cosine_min"), ".6f"), _pct(a.get("top1_agreement"))]
    if ref is not None and a.get("max_abs_err") is None:  # nothing compared: not_compared() says why
        row[4] = "n/a"
    if has_acc:
        cell = _pct(q["accuracy"])
        if q["accuracy_drop"] is not None:
            delta = -q["accuracy_drop"] * 100
            cell += f" ({0.0 if abs(delta) < 0.005 else delta:+.2f} pt)"
        row.append(cell)
    return row


def _quality(result: dict, ok_prov: list[str]) -> list[str]:
    has_acc = result["inputs"]["labels"] is not None
    shown = [q for q in result["quality"] if q["provider"] in ok_prov and q["status"] == "ok"]
    if not shown or not (has_acc or any(q["reference"] is not None for q in shown)):
        return []
    headers = ["provider", "model", "prec", "compared with", "max abs err", "rel err", "cos min", "top-1 agree"]
    out = ["agreement (rel err = max abs err / max |reference|; cos min = worst per-sample cosine)"]
    out += _table(headers + (["accuracy"] if has_acc else []), [_quality_row(result, q, has_acc) for q in shown],
                  {4, 5, 6, 7, 8})
    for q in shown:
        why = not_compared(q)
        if why:
            out.append(f"  not compared: {q['provider']} {q['model_name']} {q['precision']}: {why}")
    return out + [""]


def format_table(result: dict) -> str:
    """The human-readable report of a bench() result."""
    ok_prov = [p["name"] for p in result["providers"] if p["status"] == "ok"]
    skipped = [f"{p['name']}: {p['reason']}" for p in result["providers"] if p["status"] != "ok"]
    skipped_variants: set = set()
    out = _header(result) + _models(result)
    out += _latency(result, ok_prov, skipped, skipped_variants)
    out += _quality(result, ok_prov)
    skipped += [f"{q['provider']} {q['model_name']} {q['precision']}: {q['reason']}"
                for q in result["quality"] if q["status"] != "ok" and q["provider"] in ok_prov
                and (q["provider"], q["model"], q["precision"]) not in skipped_variants]
    if skipped:
        out.append("skipped")
        out += [f"  {line}" for line in dict.fromkeys(skipped)]
    out += [f"note: {n}" for n in result["notes"]]
    return "\n".join(out).rstrip()
