"""Reading a YAML config file: one mapping, duplicate keys refused, and every error one
line naming the file (and the line) -- what config.py builds the run's config from; and
the trainer's and the pre-flight check's command line (:class:`CommandLine`).

PyYAML keeps the last of two equal keys silently, so :class:`UniqueKeyLoader` refuses
them; :func:`read_yaml` returns the document with the line of each key, so that config.py
can name the line of a bad value.
"""
from __future__ import annotations

import argparse
import math
import os
import typing
from typing import Any, List

import yaml

__all__ = ["ConfigError", "CommandLine", "UniqueKeyLoader", "yaml_problem", "key_lines",
           "read_yaml", "parse_value"]


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names it."""


class CommandLine(argparse.ArgumentParser):
    """argparse without abbreviations (``--conf`` is not ``--config``: launch/run.sh refuses
    the one and would miss the other), whose errors are one line and exit status 2."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (--help lists the options)\n")


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last
    one, so a second ``train:`` section would silently drop the first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # <<: *anchor; its keys yield
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                raise ConfigError(
                    f"{self.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first given on line {first}); merge the two into one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: ``line L, column C: problem`` (1-based), as PyYAML's
    multi-line message would say it."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def key_lines(node) -> dict:
    """1-based line of each section key ``(section,)`` and key ``(section, name)`` of a
    composed YAML document (scalar keys only; others are left out)."""
    lines = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        lines[(key.value,)] = key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            for sub, _ in value.value:
                if isinstance(sub, yaml.ScalarNode):
                    lines[(key.value, sub.value)] = sub.start_mark.line + 1
    return lines


def read_yaml(path: str) -> tuple:
    """``(mapping, key lines)`` of the YAML config file ``path`` (lines as
    :func:`key_lines`). Raises ConfigError / FileNotFoundError naming the file."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; pass a YAML file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            loader = UniqueKeyLoader(fh)
            loader.name = path
            try:
                node = loader.get_single_node()
                doc = (loader.construct_document(node) if node is not None else None) or {}
                lines = key_lines(node)
            finally:
                loader.dispose()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: "
                              f"{exc.reason}); save the config as UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got "
                          f"{type(doc).__name__}")
    return doc, lines


def parse_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Coerce ``value`` (from YAML or a command-line string) to the declared type ``tp``
    (bool, int, float, str, ``List[...]``, ``Optional[...]``); ConfigError names ``key``
    and ``where`` (file and line, or "command line")."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return parse_value(value, next(a for a in args if a is not type(None)), key, where)
    if isinstance(value, str) and tp is not str:
        try:  # command-line values are strings; YAML gives them the same syntax as in a file
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: {key}={value!r} is not valid YAML: "
                              f"{yaml_problem(exc)}") from None
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [parse_value(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 and 1e30 (no dot, no exponent sign) as strings.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        # A number in a file is YAML's reading of the text (2024.10 -> 2024.1, 010 -> 8):
        # str() of it would not be what was written.
        if not isinstance(value, str):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}" + (
                " (YAML read the text as a number: put it in quotes)" if number else ""))
        # key=~/x: the shell expands no ~ after "key=", so a path would be ./~/x.
        return os.path.expanduser(value) if value.startswith("~/") else value
    raise ConfigError(f"{where}: {key} has unsupported type {tp}")  # pragma: no cover
