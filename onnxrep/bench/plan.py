"""What a bench will measure, decided before anything runs: `BenchPlan`.

From the settings and the loaded models: the input shapes, the evaluation arrays (--data or
random), the labels, the batch sizes, the variants (each model in fp32, and int8 when asked) and,
per batch, the timing feeds and which variants can run at that batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from . import inputs as I
from .models import BenchModel, InputSpec
from .settings import BenchSettings


@dataclass
class Variant:
    """A model in one precision; key 'm<index>' (fp32) or 'm<index>.int8'."""

    key: str
    model: int
    label: str
    precision: str  # 'fp32' or 'int8'
    path: str | None  # None: an int8 copy that could not be made (reason says why)
    static_batch: int | None
    reference: str | None  # the key it is compared with; None for the first model in fp32
    reason: str | None = None


@dataclass
class TimingBatch:
    batch: int
    feeds: dict[str, np.ndarray]
    variants: list[str]  # keys that run at this batch
    skipped: dict[str, str]  # key -> why it does not


@dataclass
class BenchPlan:
    settings: BenchSettings
    models: list[BenchModel]
    specs: list[InputSpec]
    input_shapes: dict[str, list[int]]  # checked --input-shape values
    sample_shapes: dict[str, tuple[int, ...]]  # per batched input, without the batch axis
    eval_inputs: dict[str, np.ndarray]
    num_eval: int
    source: str  # 'data' or 'random'
    labels: np.ndarray | None
    batches: list[int]
    unbatched: set = field(default_factory=set)  # scalar inputs
    notes: list[str] = field(default_factory=list)
    calib_source: str | None = None
    variants: list[Variant] = field(default_factory=list)
    timing: list[TimingBatch] = field(default_factory=list)


def make_plan(s: BenchSettings, models: list[BenchModel], specs: list[InputSpec]) -> BenchPlan:
    """Inputs, labels and batches (variants and timing come once the int8 copies exist)."""
    shapes = I.resolve_shapes(s.input_shapes, specs, api=s.shapes_from_api)
    batched = [sp for sp in specs if sp.rank != 0]
    if s.data is not None:
        eval_inputs, n_eval = I.prepare_data(s.data, specs, shapes, "data")
        sample_shapes = {sp.name: tuple(eval_inputs[sp.name].shape[1:]) for sp in batched}
        source = "data"
    else:
        sample_shapes = {sp.name: I.sample_shape(sp, shapes) for sp in batched}
        n_eval = s.samples
        eval_inputs = I.random_inputs(specs, sample_shapes, n_eval, s.seed)
        source = "random"
    labels = I.prepare_labels(s.labels, n_eval) if s.labels is not None else None
    batches = _batches(s, models, specs, shapes)
    return BenchPlan(s, models, specs, shapes, sample_shapes, eval_inputs, n_eval, source, labels, batches,
                     unbatched={sp.name for sp in specs if sp.rank == 0})


def _batches(s: BenchSettings, models: list[BenchModel], specs: list[InputSpec], shapes: dict) -> list[int]:
    """--batch, else the batch of --input-shape, else the models' shared static batch, else 1."""
    if s.batches is not None:
        batches = list(s.batches)
    else:
        given = [shapes[sp.name][0] for sp in specs if sp.name in shapes and sp.rank]
        statics = {m.static_batch for m in models}
        if given:
            batches = [given[0]]
        elif len(statics) == 1 and None not in statics:
            batches = [statics.pop()]
        else:
            batches = [1]
    if all(sp.rank == 0 for sp in specs) and batches != [1]:
        raise UsageError("the model has only scalar inputs: there is no batch axis to vary")
    return batches


def make_variants(models: list[BenchModel]) -> list[Variant]:
    out = [Variant(f"m{m.index}", m.index, m.name, "fp32", m.run_path, m.static_batch,
                   None if m.index == 0 else "m0") for m in models]
    out += [Variant(f"m{m.index}.int8", m.index, f"{m.name} int8", "int8", m.int8_path, m.static_batch,
                    f"m{m.index}", m.int8.get("reason")) for m in models if m.int8 is not None]
    return out


def make_timing(plan: BenchPlan) -> list[TimingBatch]:
    """Per batch: the feeds (the first B samples of --data, or seeded random) and who runs."""
    out = []
    by_model = {m.index: m for m in plan.models}
    s = plan.settings
    for b in plan.batches:
        if plan.source == "data":
            feeds = I.take(plan.eval_inputs, plan.num_eval, b, plan.unbatched)
        else:
            feeds = I.random_inputs(plan.specs, plan.sample_shapes, b, [s.seed, 1, b])
        runnable, skipped = [], {}
        for v in plan.variants:
            m = by_model[v.model]
            if not v.path:
                skipped[v.key] = v.reason or "not available"
            elif m.static_batch is not None and m.static_batch != b:
                inp = next(i for i in m.inputs if i.dims and isinstance(i.dims[0], int))
                skipped[v.key] = (f"static batch {m.static_batch} (input {inp.name!r} has shape {inp.shape_str()}); "
                                  f"re-export with a dynamic batch axis to time batch {b}")
            else:
                runnable.append(v.key)
        out.append(TimingBatch(b, feeds, runnable, skipped))
    return out
