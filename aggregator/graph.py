"""Dependent sources: which source needs which, in what order they can run, and the values a
source takes from the answers it needs.

A URL placeholder with a dot, `{profile.city}`, names a field of another source's answer: its
first segment is a source of the same aggregate, the rest are keys into that source's validated
payload (`SourceResult.data`, as JSON); a key of digits indexes a list (`{profile.teams.0.id}`).
The value must be a scalar (a string, number or boolean); it is then filled in like a parameter
(`aggregator.urltemplate`). When it cannot be had (the needed source failed, the field is absent,
null, an object or a list) the source is not called: it fails with the `dependency` kind, its
detail naming what it needed and why. A needed source that failed but has a configured
`fallback` lends its fallback data instead (its result already carries it).

Pure: no I/O. The config load refuses cycles and references to unknown sources or to sources
outside the aggregate (`cycles`, `outside`), so every function here may assume a sound graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aggregator.models import SourceResult
from aggregator.params import ParamValue

if TYPE_CHECKING:
    from aggregator.config import AggregateConfig, AppConfig, UpstreamConfig
    from aggregator.urltemplate import FieldRef


def is_graph(config: AppConfig, aggregate: AggregateConfig) -> bool:
    """Whether some source of `aggregate` needs another's answer (else: all run at once)."""
    ups = config.upstreams
    return any(ups[name].template.fields for name in aggregate.sources)


def waves(config: AppConfig, sources: Sequence[str]) -> list[list[str]]:
    """`sources` in topological waves: each wave needs only earlier ones; config order within.

    Joined, the waves are a topological order (what the in-turn twin follows).
    """
    done: set[str] = set()
    left = list(sources)
    order: list[list[str]] = []
    while left:
        wave = [n for n in left if config.upstreams[n].template.sources <= done]
        if not wave:  # the config load refuses cycles; never loop forever on one anyway
            raise ValueError(f"sources {', '.join(left)} need each other")
        order.append(wave)
        done.update(wave)
        left = [n for n in left if n not in done]
    return order


def cycles(config: AppConfig) -> list[list[str]]:
    """Every cycle among the upstreams' dotted placeholders, once each, e.g. `[a, b, a]`.

    References to unknown upstreams are left to the caller (they cannot close a cycle).
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    found: list[list[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for ref in config.upstreams[name].template.fields:
            target = ref.source
            if target not in config.upstreams:
                continue
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in config.upstreams:
        if name not in state:
            visit(name)
    return found


def outside(upstream: UpstreamConfig, sources: Iterable[str]) -> list[FieldRef]:
    """The placeholders of `upstream` naming a source not among `sources` (one per source)."""
    present = set(sources)
    seen: set[str] = set()
    missing = []
    for ref in upstream.template.fields:
        if ref.source not in present and ref.source not in seen:
            seen.add(ref.source)
            missing.append(ref)
    return missing


def field_values(
    upstream: UpstreamConfig, results: Mapping[str, SourceResult]
) -> dict[str, ParamValue] | str:
    """The values of `upstream`'s dotted placeholders, from the answers in `results`, keyed by
    placeholder text; or why they cannot be had (every reason, `; `-joined).

    A needed source with no result yet counts as failed: the caller waits for it first.
    """
    values: dict[str, ParamValue] = {}
    problems: dict[str, str] = {}  # a source that failed is named once, with all it was to give
    failed: dict[str, list[str]] = {}
    for ref in upstream.template.fields:
        result = results.get(ref.source)
        if result is None or not (result.ok or result.fallback):
            how = "has not answered" if result is None else f"failed ({result.status})"
            failed.setdefault(ref.source, []).append(ref.text)
            problems[ref.source] = f"needs {', '.join(failed[ref.source])}: {ref.source} {how}"
            continue
        value, why = _field(result.data, ref)
        if why is not None:
            problems[ref.text] = f"needs {ref.text}: {why}"
        else:
            assert value is not None
            values[ref.text] = value
    return "; ".join(problems.values()) if problems else values


def dependency_failed(name: str, detail: str, *, started: float | None = None) -> SourceResult:
    """A source that was not called: what it needed could not be had (`detail` says why)."""
    return SourceResult(name=name, status="dependency", ms=0.0, detail=detail, started=started)


def _field(data: Any, ref: FieldRef) -> tuple[ParamValue | None, str | None]:
    """The scalar at `ref.path` inside `data`, or why there is none."""
    current = data
    for key in ref.path:
        if isinstance(current, dict) and key in current:
            current = current[key]
        elif isinstance(current, list) and key.isascii() and key.isdigit():
            index = int(key)
            if index >= len(current):
                return None, f"{ref.text} is missing"
            current = current[index]
        else:
            return None, f"{ref.text} is missing"
    if current is None:
        return None, f"{ref.text} is missing (null)"
    if isinstance(current, dict):
        return None, f"{ref.text} is an object, not a value"
    if isinstance(current, list):
        return None, f"{ref.text} is a list, not a value"
    if isinstance(current, str | int | float | bool):
        return current, None
    return None, f"{ref.text} is a {type(current).__name__}, not a value"
