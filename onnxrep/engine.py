"""The rewrite engine: ordered rules swept over the graph to a fixed point.

A rule is a small class with three parts (after onnxscript's rewriter):

    match(node, ctx)     -> a match object, or None when the node is not the rule's pattern
    check(match, ctx)    -> None to go ahead, or the reason the rule declines (logged, reported)
    rewrite(match, ctx)  -> a Rewrite record; the graph is changed in place

The engine visits nodes of the rule's anchor op types, sweeps all rules in order, cleans up and
re-sorts the graph after every sweep that changed it, and stops when a sweep changes nothing or
after `max_sweeps` (a rule that keeps firing is a bug, reported as such). A rewrite that claims
success but leaves the graph's signature unchanged is caught too.

While rules run, the graph's runtime-fusable patterns (onnxrep.patterns: GELU, LayerNorm, SiLU,
...) are indexed, once per sweep and again after a rule changed the graph; linear.affine_of and
remove_identities decline their members, so no rule takes a piece of what a runtime fuses whole.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from . import graph as G
from . import patterns as P
from .errors import OnnxrepError, UsageError

log = logging.getLogger("onnxrep")


@dataclass
class Rewrite:
    rule: str
    replaced: list[str]
    created: list[str]
    detail: str = ""


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


def _signature(graph: gs.Graph) -> tuple:
    live = [n for n in graph.nodes if n.outputs]
    params = sum(math.prod(t.shape) for t in _constants(live))
    return (len(live), tuple(sorted(G.histogram_of(live).items())), params,
            tuple(sorted((n.name for n in live))))


def _constants(nodes):
    seen = {}
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant):
                seen[id(t)] = t
    return seen.values()


def run(graph: gs.Graph, rules: list[Rule], ctx: Context, max_sweeps: int = 32) -> Context:
    ctx.rules = tuple(r.name for r in rules)
    ctx.patterns = P.Index(graph)
    try:
        with G.tracking(graph), P.protecting(ctx.patterns):
            return _run(graph, rules, ctx, max_sweeps)
    finally:
        ctx.patterns = None  # it holds the graph: Rewritten.release must be able to drop it


def _run(graph: gs.Graph, rules: list[Rule], ctx: Context, max_sweeps: int) -> Context:
    for sweep in range(max_sweeps):
        changed = False
        for rule in rules:
            fired = _sweep_rule(graph, rule, ctx)
            if fired:
                changed = True
                G.tidy(graph)
                ctx.patterns.invalidate()
        if not changed:
            return ctx
    raise EngineError(f"rules did not reach a fixed point after {max_sweeps} sweeps "
                      f"(last counts: {dict(ctx.counts)})")


def _sweep_rule(graph: gs.Graph, rule: Rule, ctx: Context) -> int:
    fired = 0
    candidates = [n for n in graph.nodes if not rule.anchors or n.op in rule.anchors]
    if rule.outputs_first:
        candidates.reverse()
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
        before = _signature(graph)
        rw = rule.rewrite(m, ctx)
        if rw is None:
            continue
        if _signature(graph) == before:
            raise EngineError(f"rule {rule.name} reported a rewrite at {node.name} but changed nothing")
        G.release_dead(graph)  # weights the rewrite replaced: free them now, not at the next gc
        rw.rule = rule.name
        for name in rw.created:
            ctx.provenance[name] = rule.name
        ctx.rewrites.append(rw)
        log.debug("%s: %s -> %s %s", rule.name, rw.replaced, rw.created, rw.detail)
        fired += 1
    return fired


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
