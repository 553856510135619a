"""The rewrite engine: ordered rules swept over the graph to a fixed point.

A rule is a small class with three parts (after onnxscript's rewriter):

    match(node, ctx)     -> a match object, or None when the node is not the rule's pattern
    check(match, ctx)    -> None to go ahead, or the reason the rule declines (logged, reported)
    rewrite(match, ctx)  -> a Rewrite record; the graph is changed in place

The engine visits nodes of the rule's anchor op types, sweeps all rules in order, cleans up and
re-sorts the graph after every rule sweep that changed it, and stops when a sweep changes nothing
or after `max_sweeps` (a rule that keeps firing is a bug, reported as such). A rewrite that claims
success but changes nothing (its match's nodes and tensors as they were, no node added, and the
rule still matching there) is caught too. After each rewrite the weights it stopped using are
freed (onnxrep.weights.Releaser). The engine's own work per rewrite is proportional to the
rewrite, so a sweep costs O(nodes + rewrites) whatever the graph's size.

A rewrite must change only the nodes its match holds (a node, or nodes in a tuple, list, dict or
dataclass) and nodes it appends to graph.nodes: that is what the no-op check and the early
release of weights look at (what a rewrite changes elsewhere is still correct, only caught and
freed later: by the sweep cap, or at the end of the sweep).

While rules run, the graph's runtime-fusable patterns (onnxrep.patterns: GELU, LayerNorm, SiLU,
...) are indexed, once per sweep and again after a rule changed the graph; linear.affine_of and
remove_identities decline their members, so no rule takes a piece of what a runtime fuses whole.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G
from . import patterns as P
from . import weights as W
from .errors import OnnxrepError, UsageError
from .rewrite import Rewrite  # noqa: F401  (rules import it from here)

log = logging.getLogger("onnxrep")


@dataclass
class Options:
    aggressive: bool = False  # merge even when the cost model says the result is more expensive
    input_shapes: dict = field(default_factory=dict)


@dataclass
class Context:
    graph: gs.Graph
    options: Options = field(default_factory=Options)
    rewrites: list[Rewrite] = field(default_factory=list)
    declines: dict[tuple[str, str, str], int] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rules: tuple[str, ...] = ()  # names of the rules this run applies, in sweep order (set by run)
    patterns: P.Index | None = None  # runtime-fusable patterns of `graph` (set by run, rebuilt per change)

    def runs_after(self, rule: str, other: str) -> bool:
        """Whether `other` is applied after `rule` within each sweep of this run, so that a match
        `rule` leaves alone is still seen by `other` in the same sweep."""
        return rule in self.rules and other in self.rules[self.rules.index(rule) + 1 :]

    def decline(self, rule: str, node: gs.Node, reason: str) -> None:
        key = (rule, node.name, reason)
        if key not in self.declines:
            log.debug("%s declines at %s (%s): %s", rule, node.name, node.op, reason)
        self.declines[key] = self.declines.get(key, 0) + 1

    @property
    def counts(self) -> Counter:
        return Counter(r.rule for r in self.rewrites)


class Rule:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    anchors: ClassVar[tuple[str, ...]] = ()  # op types a match can start at; () = every node
    default: ClassVar[bool] = True  # opt-in rules (e.g. ones that add MACs) set this False
    outputs_first: ClassVar[bool] = False  # visit anchors from the graph outputs backwards

    def match(self, node: gs.Node, ctx: Context) -> Any | None:
        raise NotImplementedError

    def check(self, match: Any, ctx: Context) -> str | None:
        return None

    def rewrite(self, match: Any, ctx: Context) -> Rewrite | None:
        raise NotImplementedError


class EngineError(OnnxrepError):
    """A rule misbehaved (non-termination or a no-op rewrite): a bug in onnxrep."""


def run(graph: gs.Graph, rules: list[Rule], ctx: Context, max_sweeps: int = 32) -> Context:
    """Sweep `rules` over `graph` in order until a sweep changes nothing.

    Cost: each sweep visits every node once per rule (plus one cleanup and toposort per rule that
    fired); each rewrite then costs the engine work proportional to what it touched, never a pass
    over the graph, so a sweep is O(nodes + size of the rewrites)."""
    ctx.rules = tuple(r.name for r in rules)
    try:
        with G.cycle_collection_paused():
            ctx.patterns = P.Index(graph)  # per-node objects too: no full collection while it is built
            with P.protecting(ctx.patterns):
                return _run(graph, rules, ctx, max_sweeps)
    finally:
        ctx.patterns = None  # it holds the graph: Rewritten.release must be able to drop it


def _run(graph: gs.Graph, rules: list[Rule], ctx: Context, max_sweeps: int) -> Context:
    releaser = W.Releaser(graph)
    dropped: dict[int, object] = {}  # what the sweep's rewrites touched: tidy releases the dead ones
    ops: list[str] | None = None  # graph.nodes' op types while the graph is unchanged
    for sweep in range(max_sweeps):
        changed = False
        for rule in rules:
            if ops is None or len(ops) != len(graph.nodes):
                ops = [n.op for n in graph.nodes]
            if _sweep_rule(graph, rule, ctx, releaser, dropped, ops):
                changed = True
                G.tidy(graph, dropped)
                ctx.patterns.invalidate()
                ops = None
            dropped.clear()
        if not changed:
            return ctx
    raise EngineError(f"rules did not reach a fixed point after {max_sweeps} sweeps "
                      f"(last counts: {dict(ctx.counts)})")


def _sweep_rule(graph: gs.Graph, rule: Rule, ctx: Context, releaser: W.Releaser,
                dropped: dict[int, object], ops: list[str] | None = None) -> int:
    """One rule over the graph's nodes; `dropped` receives the nodes and tensors of every match
    that was rewritten, and those nodes' tensors as they were before the rewrite: what it may
    have detached, for tidy to release (graph.release_dropped). `ops`: the op type of each of
    graph.nodes, read once for the rule sweeps that change nothing: the anchors are picked from
    it without touching the other nodes (on 50k nodes reading every node's op per rule sweep
    cost 21× its 5k time: the nodes no longer fit in the CPU caches)."""
    fired = 0
    nodes = graph.nodes
    if ops is None:
        ops = [n.op for n in nodes]
    anchors = rule.anchors
    candidates = [nodes[i] for i, op in enumerate(ops) if op in anchors] if anchors else list(nodes)
    del nodes
    if rule.outputs_first:
        candidates.reverse()
    releaser.begin_sweep(graph.nodes, lazy=True)
    for node in candidates:
        if not node.outputs:  # removed by an earlier rewrite in this sweep
            continue
        m = rule.match(node, ctx)
        if m is None:
            continue
        reason = rule.check(m, ctx)
        if reason:
            ctx.decline(rule.name, node, reason)
            continue
        nodes, tensors = _parts(node, m)
        before = _state(nodes, tensors)
        watched = releaser.watch(nodes)
        touched: dict[int, object] = {}
        _touched(nodes, tensors, touched)
        releaser.before_rewrite()
        count = len(graph.nodes)
        rw = rule.rewrite(m, ctx)
        if rw is None:
            continue
        added = graph.nodes[count:]
        if not added and _state(nodes, tensors) == before and _matches_again(rule, node, ctx):
            raise EngineError(f"rule {rule.name} reported a rewrite at {node.name} but changed nothing")
        releaser.release(watched, added)  # weights the rewrite replaced: free them now, not at the next gc
        dropped.update(touched)
        rw.rule = rule.name
        for name in rw.created:
            ctx.provenance[name] = rule.name
        ctx.rewrites.append(rw)
        log.debug("%s: %s -> %s %s", rule.name, rw.replaced, rw.created, rw.detail)
        fired += 1
    releaser.end_sweep()
    return fired


# -- the no-op check: what a rewrite may have changed, before and after ---------------------------
# A rewrite changes the nodes of its match (detaches, rewires or re-attributes them) and appends the
# nodes it makes; so the engine compares the state of the anchor and of every node and tensor the
# match holds, before and after, and counts the nodes appended. That costs the size of the match.
# Only when none of it changed and the rule still matches the same anchor (so it would fire there
# forever) is the rewrite a no-op: a rule that changes something outside its match is not
# reported wrongly, and a no-op the check misses still ends at the sweep cap.

def _parts(anchor: gs.Node, match: Any, depth: int = 4) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """The anchor and the nodes and tensors held by `match` (in tuples, lists, sets, dicts and
    dataclasses, `depth` levels deep)."""
    nodes: dict[int, gs.Node] = {id(anchor): anchor}
    tensors: dict[int, gs.Tensor] = {}
    seen: set[int] = set()
    stack = [(match, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, gs.Node):
            nodes[id(x)] = x
        elif isinstance(x, gs.Tensor):
            tensors[id(x)] = x
        elif d < depth and id(x) not in seen:
            seen.add(id(x))
            if isinstance(x, (list, tuple, set, frozenset)):
                items = x
            elif isinstance(x, dict):
                items = x.values()
            elif dataclasses.is_dataclass(x) and not isinstance(x, type):
                items = [getattr(x, f.name, None) for f in dataclasses.fields(x)]
            else:
                continue
            stack.extend((i, d + 1) for i in items)
    return list(nodes.values()), list(tensors.values())


def _state(nodes: list[gs.Node], tensors: list[gs.Tensor]) -> tuple:
    """What a rewrite can change about these nodes and tensors (not a weight's storage, which
    reading it changes)."""
    return (tuple((n.name, n.op, n.domain, tuple(map(id, n.inputs)), tuple(map(id, n.outputs)),
                   _frozen(n.attrs)) for n in nodes),
            tuple((t.name, tuple(map(id, t.inputs)), tuple(map(id, t.outputs)), _frozen(t.shape),
                   _frozen(t.dtype)) for t in tensors))


def _touched(nodes: list[gs.Node], tensors: list[gs.Tensor], into: dict[int, object]) -> None:
    """The nodes and tensors of a match, and the nodes' tensors (as the lists are now), into `into`."""
    for n in nodes:
        into[id(n)] = n
    for t in tensors:
        into[id(t)] = t
    for n in nodes:
        for t in n.inputs:
            into[id(t)] = t
        for t in n.outputs:
            into[id(t)] = t


def _frozen(v):
    if isinstance(v, dict):
        return tuple((k, _frozen(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, (int, float, str, bytes, bool, type(None), np.generic)):
        return v
    return id(v)  # arrays, tensors, subgraphs, dtypes: by identity


def _matches_again(rule: Rule, node: gs.Node, ctx: Context) -> bool:
    return bool(node.outputs) and (m := rule.match(node, ctx)) is not None and not rule.check(m, ctx)


# -- registry ------------------------------------------------------------------------------------
def all_rules() -> list[Rule]:
    from .rules import REGISTRY

    return [cls() for cls in REGISTRY]


def select_rules(only: list[str] | None = None, skip: list[str] | None = None,
                 enable: list[str] | None = None) -> list[Rule]:
    """Rules in registry order: `only` picks a subset, `skip` removes, `enable` adds opt-in ones."""
    rules = all_rules()
    names = [r.name for r in rules]
    for n in (only or []) + (skip or []) + (enable or []):
        if n not in names:
            raise UsageError(f"unknown rule '{n}' (see `onnxrep rules`)")
    if only:
        chosen = [r for r in rules if r.name in only]
    else:
        chosen = [r for r in rules if r.default or r.name in (enable or [])]
    return [r for r in chosen if r.name not in (skip or [])]
