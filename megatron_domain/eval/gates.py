"""Regression gates: a stage's eval after training checked against its eval before (the
`gates:` of a pipeline stage, config.GateConfig)."""

from __future__ import annotations

import math

from megatron_domain.config import DIALOGUE_METRICS, GATE_BOUNDS, GENERATION_METRICS, GateConfig


class GateFailure(RuntimeError):
    """A stopping gate failed; the message names the stage, the metric, the values and the bound."""


def metric_value(evaluation: dict, metric: str) -> float:
    """A gate metric's value in an eval dict (eval.json's layout); KeyError naming it if absent."""
    if metric.startswith("ppl/"):
        return float(evaluation["ppl"][metric[4:]])
    if metric in GENERATION_METRICS:
        if metric not in evaluation.get("generation", {}):
            raise KeyError(f"gate metric {metric!r} was not measured: the QA metrics need \"answer\" references "
                           "and the refusal ones eval.generation.refusal (or refusal_patterns) and questions of "
                           "that kind in eval.generation.path")
        return float(evaluation["generation"][metric])
    if metric in DIALOGUE_METRICS:
        return float(evaluation["dialogues"][metric])
    for suite in evaluation.get("suites", {}).values():
        if metric in suite:
            return float(suite[metric])
    measured = sorted(k for suite in evaluation.get("suites", {}).values() for k in suite)
    raise KeyError(f"gate metric {metric!r} was not measured (suite metrics: {', '.join(measured) or 'none'})")


def flat_eval(evaluation: dict) -> dict[str, float]:
    """Every gate-able metric of an eval dict under its gate name (ppl/<set>, generation and
    dialogue metrics, suite metrics <task>/<metric>)."""
    flat = {f"ppl/{k}": float(v) for k, v in evaluation.get("ppl", {}).items()}
    for section, names in (("generation", GENERATION_METRICS), ("dialogues", DIALOGUE_METRICS)):
        flat.update({k: float(evaluation[section][k]) for k in names if k in evaluation.get(section, {})})
    for suite in evaluation.get("suites", {}).values():
        flat.update({k: float(v) for k, v in suite.items()})
    return flat


def bound_failures(gate: GateConfig, before: float, after: float) -> list[str]:
    """The bounds of `gate` that (before, after) violates, each as a phrase."""
    failures = []
    change = after - before
    if not math.isnan(gate.min) and after < gate.min:
        failures.append(f"below the minimum {gate.min:g}")
    if not math.isnan(gate.max) and after > gate.max:
        failures.append(f"above the maximum {gate.max:g}")
    if not math.isnan(gate.max_drop) and -change > gate.max_drop + 1e-12:
        failures.append(f"dropped {-change:.4g}, more than max_drop {gate.max_drop:g}")
    if not math.isnan(gate.min_gain) and change < gate.min_gain - 1e-12:
        failures.append(f"changed {change:+.4g}, less than min_gain {gate.min_gain:+g}")
    if not math.isnan(gate.max_gain) and change > gate.max_gain + 1e-12:
        failures.append(f"changed {change:+.4g}, more than max_gain {gate.max_gain:+g}")
    if not math.isnan(gate.max_rise):
        rise = change / before if before else math.inf
        if rise > gate.max_rise + 1e-12:
            failures.append(f"relative change {rise:+.1%}, more than max_rise {gate.max_rise:+.0%}")
    return failures


def describe(gate: GateConfig) -> str:
    """The gate's bounds in words, e.g. 'demo_general_mc/acc: max_drop 0.02'."""
    bounds = [f"{b} {getattr(gate, b):g}" for b in GATE_BOUNDS if not math.isnan(getattr(gate, b))]
    return f"{gate.metric}: {', '.join(bounds)}" + ("" if gate.stop else " (target, does not stop)")


def evaluate_gates(stage: str, gates: list[GateConfig], before: dict, after: dict) -> list[dict]:
    """Each gate's verdict: {stage, metric, before, after, passed, stop, description, failures}."""
    results = []
    for gate in gates:
        b, a = metric_value(before, gate.metric), metric_value(after, gate.metric)
        failures = bound_failures(gate, b, a)
        results.append({"stage": stage, "metric": gate.metric, "before": b, "after": a, "passed": not failures,
                        "stop": gate.stop, "description": describe(gate), "failures": failures})
    return results


def verdict(result: dict) -> str:
    """PASS, FAIL (a stopping gate failed) or MISSED (target) (a `stop: false` gate failed)."""
    return "PASS" if result["passed"] else ("FAIL" if result["stop"] else "MISSED (target)")


def failure_message(result: dict) -> str:
    """One line naming the stage, the metric, the values and what was violated."""
    return (f"gate failed after stage {result['stage']}: {result['metric']} {result['before']:.4g} -> "
            f"{result['after']:.4g}: {'; '.join(result['failures'])}")
