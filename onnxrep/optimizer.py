"""The optimize pipeline: open → fold → sweep → check → write temp → verify → commit.

    model = onnxrep.optimize("train.onnx")                  # ModelProto, verified
    model, report = onnxrep.optimize("train.onnx", return_report=True)

Errors are raised as onnxrep.errors types; the CLI maps them to exit codes.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping
from dataclasses import dataclass, field, replace

import onnx

from . import engine as E
from . import graph as G
from . import folding as F, shapes as S, stats, validate, verify as V
from .errors import InputError, OnnxrepError, UsageError
from .io import check_and_infer, check_model, check_not_input, check_output_path, open_model, stage_model
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
            folding: "F.FoldOptions | None" = None, inferred=None) -> tuple[onnx.ModelProto, "G.gs.Graph"]:
    """Pin shapes, infer shapes, import, fold constants (onnxrep.folding), check structure (validate).

    Works on a payload-free copy of `model` whose stubs are then pointed back at `model`'s own
    tensors (or a LeanModel's payloads, which may still be in the input file): nothing here reads
    or copies a weight, and `model` is not modified. Returns that copy (the template for export:
    opsets, IR version, metadata) and the graph. inferred(model, as_given): called with the
    shape-inferred copy before import (as_given: it is `model` itself as far as shape inference
    goes, nothing pinned or taken out), so a caller can read shapes without inferring again."""
    folding = folding or F.FoldOptions()
    proto, sources = (model.proto, list(model.payloads)) if isinstance(model, LeanModel) else (model, [])

    def keep(src, stub):
        point_stub(stub, len(sources))
        sources.append(src)

    work = without_payload(proto, min_bytes=G.PAYLOAD_MIN, on_stub=keep)
    kept = [] if folding.freeze_inputs else F.take_overridable(work)
    if input_shapes:
        pin_input_shapes(work, input_shapes)
    checked = getattr(model, "checked_inference", None)
    if checked is not None and not kept and not input_shapes and _flat(work):
        work = _shapes_from(work, checked)
        model.checked_inference = checked = None  # once: a whole payload-free copy of the model
    else:
        work = infer_shapes(work)
    if inferred is not None:
        inferred(work, not kept and not input_shapes)
    graph = G.import_graph(work)
    G.attach_payloads(graph, sources)
    F.keep_overridable(graph, kept, sources)
    F.fold(graph, work, infer_shapes, folding)
    validate.check_graph(graph)
    del work.graph.value_info[:]
    return work, graph


def _flat(model: onnx.ModelProto) -> bool:
    """No local functions and no subgraph (shape inference writes value_info into those too)."""
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return not model.functions and not any(a.type in kinds for n in model.graph.node for a in n.attribute)


def _shapes_from(work: onnx.ModelProto, checked: onnx.ModelProto) -> onnx.ModelProto:
    """`work` as infer_shapes(work) makes it, from the input check's inference (io.check_model) of
    the same model (`work` is it as given: nothing pinned, nothing taken out, payloads stubbed
    alike; strict inference that passed is what the lenient one infers). For a flat model,
    inference changes only the graph's value_info (kept ones refined, new ones appended) and its
    outputs' types: those are taken from `checked`."""
    if len(checked.graph.output) != len(work.graph.output) or len(checked.graph.node) != len(work.graph.node):
        return infer_shapes(work)
    del work.graph.value_info[:]
    work.graph.value_info.extend(checked.graph.value_info)
    for mine, theirs in zip(work.graph.output, checked.graph.output):
        mine.CopyFrom(theirs)
    return work


def keep_known_dims(model: onnx.ModelProto) -> None:
    """Leave in the model's value_info only the dims known to be right: numbers, and the symbols
    its inputs declare. Shape inference invents symbols (unk__0, ...) and may give one to dims that
    differ (every piece of an unequal SplitToSequence gets the same one), which ORT takes as a
    promise that they are equal: at its default optimization level it then reuses one buffer for
    tensors of different sizes and fails. Such a dim is written unknown (no value, no symbol),
    which ONNX always allows. Graph inputs and outputs are left as they are."""
    g = model.graph
    declared = {d.dim_param for vi in g.input if vi.type.HasField("tensor_type")
                for d in vi.type.tensor_type.shape.dim if d.HasField("dim_param")}
    for vi in g.value_info:
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param not in declared:
                d.ClearField("dim_param")


class Rewritten(LeanModel):
    """A rewritten graph as a LeanModel: `skeleton` is checked and verified (with `weights()` fed to
    ORT as arrays), then streamed to a file by io.save_model, or made a ModelProto by `model()`,
    which moves the payloads in."""

    def __init__(self, graph, template, ctx: E.Context, rules: list[E.Rule]):
        self.graph, self.ctx, self.rules = graph, ctx, rules
        lean = G.export_skeleton(graph, template, ctx.provenance)
        F.restore_overridable(graph, lean)  # initializers that are inputs: the signature stays
        keep_known_dims(lean.proto)
        super().__init__(lean.proto, lean.payloads)

    def release(self) -> None:
        """Drop the graph and the rules' arrays (once the model is written, the file holds them).
        The graph's reference cycles are broken (graph.dispose), so it is freed now, without a
        cycle collection."""
        if self.graph is not None:
            G.dispose(self.graph)
        self.graph = self.ctx.graph = None
        self.payloads = [None] * len(self.payloads)

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

    def count_macs(work: onnx.ModelProto, as_given: bool) -> None:
        # the input's MACs from prepare's shape inference when it is the one stats.macs would run
        # (the model as given, no symbolic batch to count as 1); stats.macs infers them otherwise
        if before is not None and before.get("macs") is None:
            before["macs"] = stats.macs(work, inferred=True) if as_given and stats.batch_is_static(work) \
                else stats.macs(model.proto if isinstance(model, LeanModel) else model)

    template, graph = prepare(model, options.input_shapes, folding, count_macs)
    if before is not None and before.get("macs") is None:
        before["macs"] = stats.macs(G.export_skeleton(graph, template).proto)
    if loaded:
        G.preload(graph, loaded)
    ctx = E.Context(graph, options)
    ctx.notes.extend(F.fold_log(graph).notes((folding or F.FoldOptions()).fold_limit))
    E.run(graph, rules, ctx)  # leaves the graph tidy: prepare's folding ends with graph.tidy, and
    # the engine tidies after every rule sweep that changed it (one more tidy: 0.2 s at 25k nodes)
    G.release_loaded(graph)  # weights the rules read but kept: back to the input's tensors
    return Rewritten(graph, template, ctx, rules)


def rewrite(model: onnx.ModelProto, rules: list[E.Rule], options: E.Options) -> tuple[onnx.ModelProto, E.Context]:
    r = rewrite_graph(model, rules, options)
    return r.model(), r.ctx


def optimize(model, *, rules: list[str] | None = None, skip: list[str] | None = None,
             enable: list[str] | None = None, input_shapes: dict | None = None, verify: bool = True,
             rtol: float | None = None, atol: float | None = None, aggressive: bool = False, seed: int | None = None,
             freeze_inputs: bool = False, fold_limit: int | None = None, return_report: bool = False,
             verify_options: V.VerifyOptions | None = None):
    """Re-parameterize `model` (a path, ModelProto or lean.LeanModel); see the module docstring.
    Returns the optimized ModelProto (every weight in memory); to write a file without that,
    use optimize_file. rtol/atol/seed: None takes VerifyOptions' default; verify_options: all of
    the verification's settings at once (rtol/atol/seed, when given, override its fields)."""
    with G.cycle_collection_paused():  # nothing it drops needs the collector (graph.py)
        rewritten, report = reparameterize(model, rules=rules, skip=skip, enable=enable, input_shapes=input_shapes,
                                           verify=verify, rtol=rtol, atol=atol, aggressive=aggressive, seed=seed,
                                           verify_options=verify_options, freeze_inputs=freeze_inputs,
                                           fold_limit=fold_limit)
        out = rewritten.model()
        rewritten.release()
    return (out, report) if return_report else out


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike, *, external_data: str | bool = "auto",
                  also_writes: tuple = (), **options) -> Report:
    """Optimize the model file `src` into `dst`, as `onnxrep optimize` does, without ever holding
    a whole model in memory: weights are read from `src` when a rule or the verification needs
    them, and the output is streamed to `dst` (`src` is never modified).

    The pipeline, one step after the other: open → fold → sweep the rules → check (onnx.checker)
    → write to a temporary directory beside `dst` → verify that very file against `src`, both
    loaded by ONNX Runtime from disk (verify.check) → commit (the .onnx and its data file become
    visible together; io.StagedOutput). A failure at any step leaves `dst` as it was.

    external_data: "auto" (external when the input's weights were, or above 1 GB), True, False.
    also_writes: other paths the caller will write (a report), checked like `dst` and refused if
    they would overwrite it. `options` are optimize()'s. Returns the report; report.written lists
    the files."""
    with G.cycle_collection_paused():  # nothing it drops needs the collector (graph.py)
        return _optimize_file(src, dst, external_data=external_data, also_writes=also_writes, **options)


def _optimize_file(src: str | os.PathLike, dst: str | os.PathLike, *, external_data: str | bool = "auto",
                   also_writes: tuple = (), **options) -> Report:
    """optimize_file without the cycle-collection policy around it."""
    check_output_path(src, dst)
    for extra in also_writes:
        check_output_path(src, extra, what="report")
        if Path(extra).resolve() in (Path(dst).resolve(), Path(str(dst) + ".data").resolve()):
            raise UsageError(f"report {extra} would overwrite the output model")
    if external_data not in ("auto", True, False):
        raise UsageError(f"external_data must be 'auto', True or False, not {external_data!r}")
    verify = options.pop("verify", True)
    vopts = _verify_options(options.pop("verify_options", None), options.pop("rtol", None),
                            options.pop("atol", None), options.pop("seed", None))
    info: dict = {}
    lean = open_model(src, info=info)  # open
    check_not_input(info["files"], dst, *also_writes)
    rewritten, report = reparameterize(lean, verify=False, **options)  # fold → sweep → check
    report.input = str(src)
    report.before["file_bytes"] = info.get("file_bytes")
    external = (True if info.get("external_data") else None) if external_data == "auto" else external_data

    t = time.perf_counter()
    with stage_model(rewritten, dst, external=external) as staged:  # write temp
        if verify:  # the written file against the input file, ORT loading both from disk
            rewritten.release()  # the file holds the weights now
            v0 = time.perf_counter()
            ref = V.reference(lean, vopts, rewritten.ctx.options.input_shapes, path=src)
            report.verification = V.check(ref, staged.path, vopts, _rebuild(lean, rewritten), list(rewritten.ctx.counts))
            report.verification["seconds"] = round(time.perf_counter() - v0, 3)
        written = staged.commit()  # commit
    rewritten.release()
    report.seconds += time.perf_counter() - t
    report.after["file_bytes"] = sum(p.stat().st_size for p in written)
    report.written = [str(p) for p in written]
    return report


def _verify_options(given: "V.VerifyOptions | None", rtol, atol, seed) -> V.VerifyOptions:
    base = given if given is not None else V.VerifyOptions()
    return replace(base, **{k: v for k, v in dict(rtol=rtol, atol=atol, seed=seed).items() if v is not None})


def _rebuild(lean: LeanModel, rewritten: Rewritten):
    """For the culprit search: the input rewritten without one rule (None: without any rule, which
    leaves what prepare() made of it: constant folding)."""
    last: list[Rewritten] = []

    def rebuild(without: str | None) -> Rewritten:
        while last:  # the culprit search checks one at a time: the one before is done with
            last.pop().release()
        rules = [r for r in rewritten.rules if without is not None and r.name != without]
        last.append(rewrite_graph(lean, rules, rewritten.ctx.options))
        return last[-1]
    return rebuild


def reparameterize(model, *, rules: list[str] | None = None, skip: list[str] | None = None,
                   enable: list[str] | None = None, input_shapes: dict | None = None, verify: bool = True,
                   rtol: float | None = None, atol: float | None = None, aggressive: bool = False,
                   seed: int | None = None, verify_options: V.VerifyOptions | None = None,
                   freeze_inputs: bool = False, fold_limit: int | None = None) -> tuple[Rewritten, Report]:
    """optimize() up to the written model: returns the Rewritten model (a LeanModel whose weights
    are the rules' arrays and, for weights no rule changed, the input's tensors, still in the
    input file when `model` came from a path or io.open_model) and the report.

    open → (reference run) → fold → sweep the rules → check → verify in memory (verify.check, ORT
    fed the rewritten arrays). The reference runs first: while it holds a copy of the weights,
    nothing else does; the rules then take those arrays over and release each as they replace it.
    freeze_inputs: fold initializers that are also graph inputs (overridable defaults) as constants,
    dropping them from the inputs. fold_limit: largest tensor constant folding may make, in bytes
    (default folding.DEFAULT_FOLD_LIMIT, ORT's own)."""
    t0 = time.perf_counter()
    path, lean, file_bytes = _open_input(model)
    # a dict is the API's argument (errors name input_shapes[...]); strings are the CLI's flags
    api = input_shapes is None or isinstance(input_shapes, Mapping)
    input_shapes = S.from_api(input_shapes)
    S.check_against(input_shapes, S.model_inputs(lean.proto.graph.input), api=api)
    selected = E.select_rules(rules, skip, enable)
    if fold_limit is not None and (isinstance(fold_limit, bool) or not isinstance(fold_limit, int) or fold_limit < 0):
        raise UsageError(f"fold_limit must be a number of bytes >= 0, not {fold_limit!r}")
    options = E.Options(aggressive=aggressive, input_shapes=input_shapes or {})
    vopts = _verify_options(verify_options, rtol, atol, seed)
    options.folding = F.FoldOptions(freeze_inputs=bool(freeze_inputs),
                                    fold_limit=F.DEFAULT_FOLD_LIMIT if fold_limit is None else fold_limit)
    before = stats.summarize(lean.proto, file_bytes, with_macs=False)  # MACs: rewrite_graph, from prepare's shapes
    ref = None
    verify_seconds = 0.0
    if verify:
        t = time.perf_counter()
        ref = V.reference(lean, vopts, options.input_shapes)
        verify_seconds = time.perf_counter() - t
    rewritten = rewrite_graph(lean, selected, options, ref.weights if ref else None, before)
    if ref is not None:
        ref.weights = None  # the rules own them now
    ctx = rewritten.ctx
    try:  # the full check; its shape inference also gives the report's MACs (stats.macs(known=))
        inferred = check_and_infer(rewritten.skeleton)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise OnnxrepError(f"internal error: rewritten model fails onnx.checker: {str(e).splitlines()[0]}") from e

    verification = None
    if verify:
        t = time.perf_counter()
        verification = V.check(ref, rewritten, vopts, _rebuild(lean, rewritten), list(ctx.counts))
        # both ORT runs, and reading the input's weights for the first (which the rules then reuse)
        verification["seconds"] = round(verify_seconds + time.perf_counter() - t, 3)
    return rewritten, _report(path, before, rewritten, verification, time.perf_counter() - t0, inferred)


def _open_input(model) -> tuple[str | None, LeanModel, int | None]:
    """(path or None, the model as a LeanModel, its file size) for a path, LeanModel or ModelProto."""
    path = file_bytes = None
    if isinstance(model, (str, os.PathLike)):
        path = str(model)
        file_bytes = os.path.getsize(path) if os.path.exists(path) else None
        lean = open_model(path)
    elif isinstance(model, LeanModel):
        lean = model  # open_model checked it
    elif isinstance(model, onnx.ModelProto):
        checked = check_model(model)
        lean = LeanModel.wrap(model)
        lean.checked_inference = checked
    else:
        raise InputError(f"expected a path or onnx.ModelProto, got {type(model).__name__}")
    if not any(True for _ in lean.proto.graph.node):
        raise InputError("model has no nodes")
    return path, lean, file_bytes


def _report(path, before: dict, rewritten: Rewritten, verification: dict | None, seconds: float,
            inferred: onnx.ModelProto | None = None) -> Report:
    ctx = rewritten.ctx
    return Report(
        input=path,
        before=before,
        after=stats.summarize(rewritten.skeleton, known=inferred),
        rule_counts=dict(ctx.counts),
        rewrites=[{"rule": r.rule, "replaced": r.replaced, "created": r.created, "detail": r.detail} for r in ctx.rewrites],
        declines=[{"rule": k[0], "node": k[1], "reason": k[2]} for k in ctx.declines],
        verification=verification,
        seconds=seconds,
        notes=ctx.notes,
    )
