"""Warm targets: an aggregate and its parameters, from the config, a file or the command line.

Every target is parsed and validated (typed exactly as a live query string would be) before the
first one is warmed, and every problem is reported at once, each named by its file, line (JSON
lines) or entry (TOML, config) and field. Duplicates, the same aggregate with the same typed
parameters, are warmed once.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from aggregator.config import AggregateConfig, AppConfig
from aggregator.errors import InvalidRequestError, TargetError
from aggregator.params import ParamValue

_TARGET_KEYS = ("aggregate", "params")


@dataclass(frozen=True, slots=True)
class Target:
    """One entry to warm: an aggregate and its typed, defaulted parameters."""

    aggregate: str
    params: Mapping[str, ParamValue]
    #: `aggregate` plus the parameters that differ from their defaults, as a query string.
    label: str

    @property
    def key(self) -> tuple[str, tuple[tuple[str, ParamValue], ...]]:
        """Identity for de-duplication (typed params come in the config's order)."""
        return self.aggregate, tuple(self.params.items())


def make_target(config: AppConfig, aggregate: str, raw: Mapping[str, object]) -> Target:
    """A validated target; InvalidRequestError names the field (`aggregate`, `params.NAME`)."""
    agg = config.aggregates.get(aggregate)
    if agg is None:
        known = ", ".join(sorted(config.aggregates)) or "none"
        raise InvalidRequestError("aggregate", f"unknown aggregate {aggregate!r} (known: {known})")
    _check_cached(aggregate, agg)
    try:
        params = agg.typed_params(raw)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"params.{exc.field}", exc.reason) from None
    return Target(aggregate, params, _label(aggregate, agg, params))


def _check_cached(name: str, agg: AggregateConfig) -> None:
    if agg.cache_ttl <= 0 and agg.cache_partial_ttl is None:
        raise InvalidRequestError(
            "aggregate", f"{name!r} is not cached (cache_ttl = 0): there is nothing to warm"
        )


def _label(aggregate: str, agg: AggregateConfig, params: Mapping[str, ParamValue]) -> str:
    shown = [
        (name, _text(value))
        for name, value in params.items()
        if agg.params[name].default is None or value != agg.params[name].default
    ]
    query = urlencode(shown, quote_via=quote, safe="")
    return f"{aggregate} {query}" if query else aggregate


def _text(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_targets(config: AppConfig, aggregate: str | None, source: str) -> list[Target]:
    """The `warm` targets of `aggregate` (of every aggregate when None) in the config."""
    if aggregate is not None and aggregate not in config.aggregates:
        known = ", ".join(sorted(config.aggregates)) or "none"
        raise TargetError([f"AGGREGATE: unknown aggregate {aggregate!r} (known: {known})"])
    names = [aggregate] if aggregate is not None else list(config.aggregates)
    targets: list[Target] = []
    problems: list[str] = []
    for name in names:
        agg = config.aggregates[name]
        entries: list[Mapping[str, object]] = list(agg.warm)
        if not entries and aggregate is not None:
            try:
                _check_cached(name, agg)
            except InvalidRequestError as exc:
                raise TargetError([f"AGGREGATE: {exc.reason}"]) from None
            if any(spec.default is None for spec in agg.params.values()):
                raise TargetError(
                    [
                        f"AGGREGATE: {name!r} has no warm targets in {source}: add "
                        f"`warm = [{{...}}]` under [aggregates.{name}], or give --param NAME=VALUE"
                    ]
                )
            entries = [{}]  # no required parameters: its one entry has the defaults
        for i, raw in enumerate(entries):
            try:
                targets.append(make_target(config, name, raw))
            except InvalidRequestError as exc:
                where = f"aggregates.{name}.warm[{i}]"
                if exc.field != "aggregate":
                    where += "." + exc.field.removeprefix("params.")
                problems.append(f"{source}: {where}: {exc.reason}")
    if problems:
        raise TargetError(problems)
    if not targets:
        raise TargetError([f"--all: no aggregate in {source} has warm targets"])
    return targets


def file_targets(config: AppConfig, path: Path) -> list[Target]:
    """Targets from a JSON lines (.jsonl, .json) or TOML (.toml, `[[targets]]`) file."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".toml"):
        raise TargetError([f"{path}: unknown kind of targets file (use .jsonl, .json or .toml)"])
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TargetError([f"{path}: cannot read the targets file: {reason}"]) from None
    entries = _toml_entries(text) if suffix == ".toml" else _json_lines(text)
    targets: list[Target] = []
    problems: list[str] = []
    for where, entry, unreadable in entries:
        if unreadable is not None:
            problems.append(f"{path}: {where}: {unreadable}")
            continue
        try:
            targets.append(_entry_target(config, entry))
        except InvalidRequestError as exc:
            problems.append(f"{path}: {where}: {exc.field}: {exc.reason}")
    if problems:
        raise TargetError(problems)
    if not targets:
        raise TargetError([f"{path}: no targets in the file"])
    return targets


#: (where, entry, None) for an entry to validate; (where, None, reason) for one unreadable.
_Entries = Iterator[tuple[str, object, str | None]]


def _json_lines(text: str) -> _Entries:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line), None
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            yield f"line {number}", None, f"not JSON ({reason}); expected one object per line"


def _toml_entries(text: str) -> _Entries:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        yield "(file)", None, f"not valid TOML: {exc}"
        return
    for key in sorted(doc.keys() - {"targets"}):
        yield key, None, "unknown key (expected [[targets]] tables)"
    entries = doc.get("targets", [])
    if not isinstance(entries, list):
        yield "targets", None, "must be an array of tables ([[targets]])"
        return
    for i, entry in enumerate(entries):
        yield f"targets[{i}]", entry, None


def _entry_target(config: AppConfig, entry: object) -> Target:
    if not isinstance(entry, dict):
        raise InvalidRequestError(
            "(entry)", 'must be an object such as {"aggregate": "dashboard", "params": {...}}'
        )
    for key in entry:
        if key not in _TARGET_KEYS:
            raise InvalidRequestError(str(key), "unknown key (expected aggregate, params)")
    aggregate = entry.get("aggregate")
    if not isinstance(aggregate, str) or not aggregate:
        raise InvalidRequestError("aggregate", "is required, a non-empty string")
    params = entry.get("params", {})
    if not isinstance(params, dict):
        raise InvalidRequestError("params", "must be an object of parameter values")
    return make_target(config, aggregate, params)


def collect_targets(
    config: AppConfig,
    *,
    aggregate: str | None = None,
    params: Mapping[str, str] | None = None,
    all_targets: bool = False,
    targets_file: Path | None = None,
    config_source: str = "the config",
) -> tuple[list[Target], int]:
    """Every target asked for, validated, duplicates dropped; and how many were dropped.

    AGGREGATE alone means its configured targets; with `params`, exactly that one entry; a
    targets file adds its own. Raises TargetError with every problem found, so one run shows
    them all.
    """
    if params and aggregate is None:
        raise TargetError(["--param needs an AGGREGATE"])
    if all_targets and aggregate is not None:
        raise TargetError(["give AGGREGATE or --all, not both"])
    if not (aggregate or all_targets or targets_file):
        raise TargetError(["give AGGREGATE (with --param NAME=VALUE ...), --all or --targets FILE"])
    found: list[Target] = []
    problems: list[str] = []
    try:
        if aggregate is not None and params:
            found.append(_command_line_target(config, aggregate, params))
        elif aggregate is not None or all_targets:
            found += config_targets(config, aggregate, config_source)
    except TargetError as exc:
        problems += exc.problems
    if targets_file is not None:
        try:
            found += file_targets(config, targets_file)
        except TargetError as exc:
            problems += exc.problems
    if problems:
        raise TargetError(problems)
    unique: dict[tuple[str, tuple[tuple[str, ParamValue], ...]], Target] = {}
    for target in found:
        unique.setdefault(target.key, target)
    return list(unique.values()), len(found) - len(unique)


def _command_line_target(config: AppConfig, aggregate: str, params: Mapping[str, str]) -> Target:
    try:
        return make_target(config, aggregate, params)
    except InvalidRequestError as exc:
        if exc.field == "aggregate":
            raise TargetError([f"AGGREGATE: {exc.reason}"]) from None
        raise TargetError([f"--param {exc.field.removeprefix('params.')}: {exc.reason}"]) from None
