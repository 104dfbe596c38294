"""Errors a user can act on: a bad config value, an unknown key, an output that cannot be written.

Config validation raises :class:`UsageError` (a ``ValueError``, so code that expects ValueError keeps
working) before any model loads. Process entry points (:func:`adpo.runtime.run_as_process`) print it as one
line, ``adpo: error: <message>``, and exit with code 2; ``ADPO_DEBUG=1`` (or ``adpo --debug``) re-raises it
with its traceback. :func:`parse_config` is the one way a stage turns its command line and YAML into config
dataclasses, so unknown keys become a UsageError too.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

DEBUG_ENV = "ADPO_DEBUG"
# OSErrors the user fixes (free space, choose a writable place), not bugs: reported in one line.
USER_OS_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
                  errno.EACCES: "choose a writable location or fix its permissions",
                  errno.EPERM: "choose a writable location or fix its permissions",
                  errno.EROFS: "choose a location on a writable file system"}


class UsageError(ValueError):
    """A config value, key or path the user has to change; its message names the key, the value and the fix."""


def debugging() -> bool:
    """Whether errors should keep their traceback (``ADPO_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces folded, so an error prints as one line."""
    return re.sub(r"\s+", " ", text).strip()


def error_line(error: BaseException) -> str | None:
    """The one line a process prints for ``error``, or None when it is not the user's to fix (a bug: keep the
    traceback)."""
    if isinstance(error, UsageError):
        return one_line(str(error))
    if isinstance(error, OSError) and error.errno in USER_OS_ERRORS:
        where = f" ({error.filename})" if error.filename else ""
        return one_line(f"{error.strerror or error}{where}; {USER_OS_ERRORS[error.errno]}")
    return None


def parse_config(dataclass_types: Iterable[type], argv: list[str] | None, prog: str = "adpo",
                 description: str | None = None) -> tuple[Any, ...]:
    """The stage's config dataclasses from ``argv`` (``--config FILE`` YAML, then ``--key value`` overrides), by
    TRL's TrlParser. A missing or malformed ``--config`` file, unknown keys, values of the wrong kind and settings
    that transformers or TRL refuse while the config is built raise :class:`UsageError`."""
    import yaml
    from trl import TrlParser

    dataclass_types = list(dataclass_types)
    renames = _deprecated_renames(dataclass_types)
    argv = _renamed_argv(list(sys.argv[1:] if argv is None else argv), renames)
    if "--config" in argv:
        index = argv.index("--config")
        path = argv[index + 1] if index + 1 < len(argv) else None
        if path is None or not Path(path).is_file():
            raise UsageError(f"--config {path!r} is not a file; pass the path of a YAML config")
        _check_yaml_kinds(path, dataclass_types, renames)

    class OneLineParser(TrlParser):
        def error(self, message: str):  # argparse would print its whole usage, hundreds of keys for a trainer
            raise UsageError(f"{one_line(message)}; `{prog} --help` lists the keys and their types")

        def set_defaults_with_config(self, **kwargs):  # the YAML's keys, old spellings renamed
            return super().set_defaults_with_config(**renamed_keys(kwargs, renames, "--config"))

    parser = OneLineParser(dataclass_types, prog=prog, description=description)
    try:
        return tuple(parser.parse_args_and_config(argv))
    except UsageError:
        raise
    except yaml.YAMLError as error:  # its message names the line and column
        raise UsageError(f"--config {argv[argv.index('--config') + 1]!r} is not valid YAML: {one_line(str(error))}") from error
    except ValueError as error:
        if str(error).startswith("Config file"):  # TrlParser: the YAML is not a mapping
            raise UsageError(one_line(f"{str(error).rstrip('.')}; write one `key: value` per line")) from error
        unknown = _unknown_keys(str(error))
        if unknown is None:
            # building the config ran no model code: a ValueError here is a setting transformers or TRL refuse
            raise UsageError(one_line(str(error))) from error
        raise UsageError(f"unknown key(s) {', '.join(unknown)}; check their spelling (`{prog} --help` lists the keys)") from error


def _deprecated_renames(dataclass_types: Iterable[type]) -> dict[str, str]:
    """Old key -> new key for the renamed keys these dataclasses declare under their new name only."""
    import dataclasses

    from adpo.threat import DEPRECATED_THREAT_KEYS

    names = {field.name for dataclass_type in dataclass_types for field in dataclasses.fields(dataclass_type)}
    return {old: new for old, new in DEPRECATED_THREAT_KEYS.items() if new in names and old not in names}


def _warn_renamed(old: str, new: str, where: str) -> None:
    import warnings

    warnings.warn(f"{where}: the key {old!r} is deprecated; write {new!r} (the same attack key in every stage)",
                  FutureWarning, stacklevel=4)


def renamed_keys(values: dict[str, Any], renames: dict[str, str], where: str) -> dict[str, Any]:
    """``values`` with old keys renamed (a warning each); both spellings at once is a UsageError."""
    renamed = dict(values)
    for old, new in renames.items():
        if old in renamed:
            if new in renamed:
                raise UsageError(f"{where}: {old!r} and {new!r} are the same setting; keep only {new!r}")
            _warn_renamed(old, new, where)
            renamed[new] = renamed.pop(old)
    return renamed


def _renamed_argv(argv: list[str], renames: dict[str, str]) -> list[str]:
    """Command-line ``--old value`` / ``--old=value`` as ``--new``, with a warning each."""
    renamed = []
    for item in argv:
        key, equals, value = item.partition("=")
        if key.startswith("--") and key[2:] in renames:
            _warn_renamed(key[2:], renames[key[2:]], "command line")
            item = f"--{renames[key[2:]]}{equals}{value}"
        renamed.append(item)
    return renamed


# What a YAML value may be for a key of each scalar type (a string is always allowed: argparse converts it, and
# names the key when it cannot).
_OUR_PACKAGES = ("adpo", "pairs", "trainers", "transfer")
_YAML_KINDS = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"),
               "bool": ((bool,), "true or false"), "str": ((str, int, float), "a single value")}


def _scalar_kind(annotation: Any) -> str | None:
    """"int", "float", "bool" or "str" when ``annotation`` is that type or it or None; else None. Annotations are
    strings where declared ("float | None") and types once a HfArgumentParser has resolved them in place."""
    import types
    import typing

    if isinstance(annotation, str):
        names = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
    else:
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        members = typing.get_args(annotation) if union else (annotation,)
        names = [m.__name__ if isinstance(m, type) else str(m) for m in members if m is not type(None)]
    return names[0] if len(names) == 1 and names[0] in _YAML_KINDS else None


def _check_yaml_kinds(path: str, dataclass_types: Iterable[type], renames: dict[str, str]) -> None:
    """Refuse a YAML value of the wrong kind for its key (a list or a mapping where one value goes, a float or a
    boolean where a whole number goes): argparse converts only strings, so it would reach the config unchecked."""
    import dataclasses

    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return  # parse_config reports it
    if not isinstance(content, dict):
        return
    kinds = {}
    for dataclass_type in dataclass_types:
        # only the keys this project declares (annotated as strings: "int", "float | None", ...); transformers' and
        # TRL's own fields accept looser forms (report_to: [] or "none") that their parsers handle
        ours = {name for klass in dataclass_type.__mro__ if klass.__module__.split(".")[0] in _OUR_PACKAGES
                for name in vars(klass).get("__annotations__", {})}
        for field in dataclasses.fields(dataclass_type):
            kind = _scalar_kind(field.type)
            if field.name in ours and kind is not None:
                kinds[field.name] = kind
    for key, value in content.items():
        key = renames.get(key, key)
        if key not in kinds or value is None or isinstance(value, str):
            continue
        allowed, expected = _YAML_KINDS[kinds[key]]
        if not isinstance(value, allowed) or (isinstance(value, bool) and kinds[key] != "bool"):
            raise UsageError(f"{key}={value!r} in {path}: expected {expected}, got a {type(value).__name__}; "
                             f"write `{key}: <{kinds[key]}>`")


def _unknown_keys(message: str) -> list[str] | None:
    """The keys named by TrlParser's / HfArgumentParser's unknown-argument errors (None: another error)."""
    if not re.match(r"(Unknown arguments from config file|Some (specified arguments|keys) are not used)", message):
        return None
    listed = re.search(r"\[(.*)\]", message)
    items = re.findall(r"'([^']*)'", listed.group(1)) if listed else []
    return [item.removeprefix("--") for item in items if item.startswith("--")] or items or [message]
