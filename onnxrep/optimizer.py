"""The optimize pipeline: prepare → rewrite to a fixed point → check → verify → report.

    model = onnxrep.optimize("train.onnx")                  # ModelProto, verified
    model, report = onnxrep.optimize("train.onnx", return_report=True)

Errors are raised as onnxrep.errors types; the CLI maps them to exit codes.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Mapping
from dataclasses import dataclass, field

import onnx

from . import engine as E
from . import graph as G
from . import folding as F, shapes as S, stats, validate, verify as V
from .errors import InputError, OnnxrepError, UsageError, VerificationError
from .io import check_model, check_not_input, check_output_path, open_model, run_checker, save_model
from .lean import LeanModel, point_stub, without_payload

log = logging.getLogger("onnxrep")


@dataclass
class Report:
    input: str | None
    before: dict
    after: dict
    rule_counts: dict[str, int]
    rewrites: list[dict]
    declines: list[dict]
    verification: dict | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # files optimize_file wrote

    def to_dict(self) -> dict:
        return {
            "schema_version": 1,
            "input": self.input,
            "before": self.before,
            "after": self.after,
            "rule_counts": self.rule_counts,
            "rewrites": self.rewrites,
            "declines": self.declines,
            "verification": self.verification,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
            "written": self.written,
        }


def pin_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Write `shapes` (checked by shapes.check_against) into the model's input types."""
    names = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        tt = names[name].type.tensor_type
        del tt.shape.dim[:]
        for v in dims:
            tt.shape.dim.add().dim_value = v


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes for every tensor where ONNX can infer them (with shape-arithmetic propagation).
    Give it a payload-free model (lean.without_payload, graph.export_skeleton): inference serializes
    its input, which for a model with weights costs a copy of them (and fails above 2 GB)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # inference is best-effort: rules that need shapes decline without them
        log.debug("shape inference failed: %s", e)
        return model


def prepare(model: "onnx.ModelProto | LeanModel", input_shapes: dict | None = None,
            folding: "F.FoldOptions | None" = None) -> tuple[onnx.ModelProto, "G.gs.Graph"]:
    """Pin shapes, infer shapes, import, fold constants (onnxrep.folding), check structure (validate).

    Works on a payload-free copy of `model` whose stubs are then pointed back at `model`'s own
    tensors (or a LeanModel's payloads, which may still be in the input file): nothing here reads
    or copies a weight, and `model` is not modified. Returns that copy (the template for export:
    opsets, IR version, metadata) and the graph."""
    folding = folding or F.FoldOptions()
    proto, sources = (model.proto, list(model.payloads)) if isinstance(model, LeanModel) else (model, [])

    def keep(src, stub):
        point_stub(stub, len(sources))
        sources.append(src)

    work = without_payload(proto, min_bytes=G.PAYLOAD_MIN, on_stub=keep)
    kept = [] if folding.freeze_inputs else F.take_overridable(work)
    if input_shapes:
        pin_input_shapes(work, input_shapes)
    work = infer_shapes(work)
    graph = G.import_graph(work)
    G.attach_payloads(graph, sources)
    F.keep_overridable(graph, kept, sources)
    F.fold(graph, work, infer_shapes, folding)
    validate.check_graph(graph)
    del work.graph.value_info[:]
    return work, graph


class Rewritten(LeanModel):
    """A rewritten graph as a LeanModel: `skeleton` is checked and verified (with `weights()` fed to
    ORT as arrays), then streamed to a file by io.save_model, or made a ModelProto by `model()`,
    which moves the payloads in."""

    def __init__(self, graph, template, ctx: E.Context, rules: list[E.Rule]):
        self.graph, self.ctx, self.rules = graph, ctx, rules
        lean = G.export_skeleton(graph, template, ctx.provenance)
        F.restore_overridable(graph, lean)  # initializers that are inputs: the signature stays
        super().__init__(lean.proto, lean.payloads)

    def release(self) -> None:
        """Drop the graph and the rules' arrays (once the model is written, the file holds them)."""
        self.graph = self.ctx.graph = None
        self.payloads = [None] * len(self.payloads)
        gc.collect()  # graphsurgeon's tensors and nodes sit in reference cycles

    @property
    def skeleton(self) -> onnx.ModelProto:
        return self.proto

    def model(self) -> onnx.ModelProto:
        return G.fill_payloads(self, self.graph)


def rewrite_graph(model: "onnx.ModelProto | LeanModel", rules: list[E.Rule], options: E.Options,
                  loaded: dict | None = None, before: dict | None = None) -> Rewritten:
    """`loaded`: arrays already read out of `model` (by the verification's reference run), which
    the rules then use instead of reading the weights a second time. `before`: the input's
    statistics; MACs it could not count (shapes known only after folding) are counted on the
    folded graph, which computes the same thing."""
    folding = getattr(options, "folding", None)  # set by reparameterize (engine.Options has no field for it)
    template, graph = prepare(model, options.input_shapes, folding)
    if before is not None and before.get("macs") is None:
        before["macs"] = stats.macs(G.export_skeleton(graph, template).proto)
    if loaded:
        G.preload(graph, loaded)
    ctx = E.Context(graph, options)
    ctx.notes.extend(F.fold_log(graph).notes((folding or F.FoldOptions()).fold_limit))
    E.run(graph, rules, ctx)
    G.tidy(graph)
    G.release_loaded(graph)  # weights the rules read but kept: back to the input's tensors
    return Rewritten(graph, template, ctx, rules)


def rewrite(model: onnx.ModelProto, rules: list[E.Rule], options: E.Options) -> tuple[onnx.ModelProto, E.Context]:
    r = rewrite_graph(model, rules, options)
    return r.model(), r.ctx


def optimize(model, *, rules: list[str] | None = None, skip: list[str] | None = None,
             enable: list[str] | None = None, input_shapes: dict | None = None, verify: bool = True,
             rtol: float | None = None, atol: float = 0.0, aggressive: bool = False, seed: int = 0,
             freeze_inputs: bool = False, fold_limit: int | None = None, return_report: bool = False):
    """Re-parameterize `model` (a path, ModelProto or lean.LeanModel); see the module docstring.
    Returns the optimized ModelProto (every weight in memory); to write a file without that,
    use reparameterize and io.save_model, as the CLI does."""
    rewritten, report = reparameterize(model, rules=rules, skip=skip, enable=enable, input_shapes=input_shapes,
                                       verify=verify, rtol=rtol, atol=atol, aggressive=aggressive, seed=seed,
                                       freeze_inputs=freeze_inputs, fold_limit=fold_limit)
    out = rewritten.model()
    return (out, report) if return_report else out


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike, *, external_data: str | bool = "auto",
                  also_writes: tuple = (), **options) -> Report:
    """Optimize the model file `src` into `dst`, as `onnxrep optimize` does, without ever holding
    a whole model in memory: weights are read from `src` when a rule or the verification needs
    them, and the output is streamed to `dst` (written atomically; `src` is never modified).
    external_data: "auto" (external when the input's weights were, or above 1 GB), True, False.
    also_writes: other paths the caller will write (a report), checked like `dst` and refused if
    they would overwrite it. `options` are optimize()'s. Returns the report; report.written lists
    the files."""
    check_output_path(src, dst)
    for extra in also_writes:
        check_output_path(src, extra)
        if Path(extra).resolve() in (Path(dst).resolve(), Path(str(dst) + ".data").resolve()):
            raise UsageError(f"{extra} would overwrite the output model")
    if external_data not in ("auto", True, False):
        raise UsageError(f"external_data must be 'auto', True or False, not {external_data!r}")
    verify = options.pop("verify", True)
    info: dict = {}
    lean = open_model(src, info=info)
    check_not_input(info["files"], dst, *also_writes)
    rewritten, report = reparameterize(lean, verify=False, **options)
    report.input = str(src)
    report.before["file_bytes"] = info.get("file_bytes")
    external = (True if info.get("external_data") else None) if external_data == "auto" else external_data

    def check(path):  # the written file, before it is moved into place: ORT reads both models from disk
        rewritten.release()
        report.verification = _verify_files(src, path, lean, rewritten, options.get("rtol"), options.get("atol", 0.0),
                                            options.get("seed", 0))

    t = time.perf_counter()
    written = save_model(rewritten, dst, external=external, before_commit=check if verify else None)
    report.seconds += time.perf_counter() - t
    report.after["file_bytes"] = sum(p.stat().st_size for p in written)
    report.written = [str(p) for p in written]
    return report


def reparameterize(model, *, rules: list[str] | None = None, skip: list[str] | None = None,
                   enable: list[str] | None = None, input_shapes: dict | None = None, verify: bool = True,
                   rtol: float | None = None, atol: float = 0.0, aggressive: bool = False,
                   seed: int = 0, freeze_inputs: bool = False,
                   fold_limit: int | None = None) -> tuple[Rewritten, Report]:
    """optimize() up to the written model: returns the Rewritten model (a LeanModel whose weights
    are the rules' arrays and, for weights no rule changed, the input's tensors, still in the
    input file when `model` came from a path or io.open_model) and the report.
    freeze_inputs: fold initializers that are also graph inputs (overridable defaults) as constants,
    dropping them from the inputs. fold_limit: largest tensor constant folding may make, in bytes
    (default folding.DEFAULT_FOLD_LIMIT, ORT's own)."""
    t0 = time.perf_counter()
    path = None
    if isinstance(model, (str, os.PathLike)):
        path = str(model)
        file_bytes = os.path.getsize(path) if os.path.exists(path) else None
        lean = open_model(path)
    elif isinstance(model, LeanModel):
        lean, file_bytes = model, None  # open_model checked it
    elif isinstance(model, onnx.ModelProto):
        check_model(model)
        lean, file_bytes = LeanModel.wrap(model), None
    else:
        raise InputError(f"expected a path or onnx.ModelProto, got {type(model).__name__}")
    if not any(True for _ in lean.proto.graph.node):
        raise InputError("model has no nodes")
    # a dict is the API's argument (errors name input_shapes[...]); strings are the CLI's flags
    api = input_shapes is None or isinstance(input_shapes, Mapping)
    input_shapes = S.from_api(input_shapes)
    S.check_against(input_shapes, S.model_inputs(lean.proto.graph.input), api=api)
    selected = E.select_rules(rules, skip, enable)
    if fold_limit is not None and (isinstance(fold_limit, bool) or not isinstance(fold_limit, int) or fold_limit < 0):
        raise UsageError(f"fold_limit must be a number of bytes >= 0, not {fold_limit!r}")
    options = E.Options(aggressive=aggressive, input_shapes=input_shapes or {})
    options.folding = F.FoldOptions(freeze_inputs=bool(freeze_inputs),
                                    fold_limit=F.DEFAULT_FOLD_LIMIT if fold_limit is None else fold_limit)
    before = stats.summarize(lean.proto, file_bytes)
    loaded = None
    verify_seconds = 0.0
    if verify:  # the reference run first: while it holds a copy of the weights, nothing else does;
        # the rules then take those arrays over, and release each as they replace it
        t = time.perf_counter()
        feeds, reference, loaded = _reference(lean, options, seed)
        verify_seconds = time.perf_counter() - t
    rewritten = rewrite_graph(lean, selected, options, loaded, before)
    loaded = None
    ctx = rewritten.ctx
    try:
        run_checker(rewritten.skeleton, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise OnnxrepError(f"internal error: rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from e

    verification = None
    if verify:  # ORT reads the graph's arrays as they are, no copy
        t = time.perf_counter()
        verification = _verify(lean, lean, lambda: V.run(rewritten.skeleton, feeds, weights=rewritten.weights()),
                               rewritten, rtol, atol, feeds, reference)
        # both ORT runs, and reading the input's weights for the first (which the rules then reuse)
        verification["seconds"] = round(verify_seconds + time.perf_counter() - t, 3)
    report = Report(
        input=path,
        before=before,
        after=stats.summarize(rewritten.skeleton),
        rule_counts=dict(ctx.counts),
        rewrites=[{"rule": r.rule, "replaced": r.replaced, "created": r.created, "detail": r.detail} for r in ctx.rewrites],
        declines=[{"rule": k[0], "node": k[1], "reason": k[2]} for k in ctx.declines],
        verification=verification,
        seconds=time.perf_counter() - t0,
        notes=ctx.notes,
    )
    return rewritten, report


def _reference(lean: LeanModel, options, seed) -> tuple[dict, dict, dict]:
    feeds = V.random_inputs(V.input_specs(lean.proto, options.input_shapes), seed)
    try:
        light, weights = V.split_lean(lean)
        return feeds, V.run(light, feeds, weights), weights
    except Exception as e:
        raise InputError(f"ONNX Runtime cannot run the input model: {str(e).strip().splitlines()[0][:300]}") from e


def _verify_files(src, path, lean: LeanModel, rewritten: Rewritten, rtol, atol, seed) -> dict:
    """Verification of the optimized model as written (`path`) against the input file `src`, each
    loaded by ONNX Runtime from disk: what is checked is the very file that will be delivered."""
    t = time.perf_counter()
    feeds = V.random_inputs(V.input_specs(lean.proto, rewritten.ctx.options.input_shapes), seed)
    try:
        reference = V.run_file(src, feeds)
    except Exception as e:
        raise InputError(f"ONNX Runtime cannot run the input model: {str(e).strip().splitlines()[0][:300]}") from e
    verification = _verify(lean, src, lambda: V.run_file(path, feeds), rewritten, rtol, atol, feeds, reference)
    verification["seconds"] = round(time.perf_counter() - t, 3)
    return verification


def _verify(model: LeanModel, original, candidate, rewritten: Rewritten, rtol, atol, feeds, reference) -> dict:
    """Compare `candidate()` (the optimized model's outputs on `feeds`) with `reference`. `original`
    (the input as a LeanModel or its path) gives ORT's own noise floor where the strict check fails;
    a failure names the rule responsible when leaving one out makes the outputs match."""
    if rtol is None:  # by the precision the model computes in, not only its outputs' dtype
        rtol = V.model_rtol(model.proto)
    try:
        got = candidate()
        result = V.VerifyResult(V.compare(reference, got, rtol, atol),
                                {k: list(v.shape) for k, v in feeds.items()})
    except Exception as e:
        raise VerificationError(f"ONNX Runtime cannot run the optimized model: {str(e).strip().splitlines()[0][:300]}") from e
    if not result.ok:
        result = _widen_to_noise_floor(original, result, reference, feeds)
    summary = {
        "ok": result.ok,
        "max_rel_error": result.max_rel,
        "outputs": [{"name": o.name, "max_abs": o.max_abs, "scale": o.scale, "tolerance": o.tolerance} for o in result.outputs],
        "input_shapes": result.input_shapes,
        "noise_floor": result.noise_floor,
    }
    if result.ok:
        return summary
    culprit = _find_culprit(model, rewritten.ctx, rewritten.rules, rewritten.ctx.options, rtol, atol, reference, feeds)
    worst = max(result.outputs, key=lambda o: o.rel)
    who = f"; rule '{culprit}' is responsible (passes without it)" if culprit else ""
    raise VerificationError(
        f"verification failed: output '{worst.name}' differs by {worst.max_abs:.3g} "
        f"(relative {worst.rel:.3g}, tolerance {worst.tolerance:.3g}){who}",
        culprit=culprit, max_error=worst.rel,
    )


def _widen_to_noise_floor(model, result, reference, feeds):
    """Deep fp32 graphs carry rounding noise of their own: an exactly equivalent graph with its
    ops in a different order differs by more than 1e-5 of the output scale (ResNet-50: ~1.3e-5,
    while both are equally far from the float64 result). Measure that noise with ORT's own
    fusions on the *original* graph and accept up to twice it, never more than 10× the tolerance."""
    try:
        sess = V.session(model, optimize=True)
        names = [o.name for o in sess.get_outputs()]
        fused = dict(zip(names, sess.run(names, feeds)))
    except Exception:  # no second opinion: keep the strict verdict
        return result
    floor = V.compare(reference, fused, 0.0, 0.0)
    for diff, noise in zip(result.outputs, floor):
        if diff.scale and noise.max_abs < float("inf"):
            diff.tolerance = max(diff.tolerance, min(2 * noise.max_abs, 10 * diff.tolerance))
    result.noise_floor = {n.name: n.max_abs for n in floor}
    return result


def _find_culprit(model, ctx, selected, options, rtol, atol, reference, feeds) -> str | None:
    """Re-run without each rule that fired; the first whose absence makes outputs match is named."""
    for name in ctx.counts:
        rules = [r for r in selected if r.name != name]
        try:
            out, _ = rewrite(model, rules, options)
            if V.verify(model.proto, out, rtol, atol, options.input_shapes, 0, reference, feeds).ok:
                return name
        except Exception:  # a variant that fails to build tells us nothing about the culprit
            continue
    return None
