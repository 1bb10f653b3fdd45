"""Loading policy files: YAML with every error located as ``file:line:col: what (did you mean ...?)``.

PyYAML composes the document into nodes (which know their line and column); we build the plain
Python value ourselves so we can refuse duplicate keys, recursive aliases and alias bombs, and keep
a map from each key path to where it was written. pydantic then validates the value, and each of
its errors is mapped back through that map to the line a person has to fix.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from qmtl_core.errors import PolicyError
from qmtl_core.grammar import decode_text
from qmtl_core.policy._models import PolicyProblem, WorldPolicy

Path_ = tuple[str | int, ...]

#: Guards against hostile or broken documents (alias bombs, runaway nesting).
MAX_NODES = 100_000
MAX_DEPTH = 64


@dataclass(frozen=True)
class Mark:
    """A 1-based position in the source."""

    line: int
    column: int


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy file, located."""

    mark: Mark | None
    message: str
    hint: str | None = None

    def to_error(self, file: str) -> PolicyError:
        """The ``PolicyError`` a caller raises for this problem."""
        return PolicyError(self.message, file=file, line=self.mark.line if self.mark else None,
                           column=self.mark.column if self.mark else None, hint=self.hint)


class _Invalid(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _mark(yaml_mark: Any) -> Mark | None:
    if yaml_mark is None:
        return None
    return Mark(yaml_mark.line + 1, yaml_mark.column + 1)


def dotted(path: Path_) -> str:
    """``('rules', 2, 'min')`` → ``rules[2].min``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class _Builder:
    """Turns composed YAML nodes into Python values, recording where every key and value sits."""

    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.values: dict[Path_, Mark] = {}
        self.keys: dict[Path_, Mark] = {}
        self._visited = 0
        self._active: set[int] = set()

    def build(self, node: yaml.Node, path: Path_ = ()) -> Any:
        self._visited += 1
        if self._visited > MAX_NODES:
            raise _Invalid(Problem(_mark(node.start_mark), f"document has more than {MAX_NODES} "
                                   "values (an alias bomb?)", "write the policy out plainly"))
        if len(path) > MAX_DEPTH or id(node) in self._active:
            raise _Invalid(Problem(_mark(node.start_mark), "nesting is too deep or an alias refers to "
                                   "itself", "remove the recursive anchor/alias"))
        self.values[path] = _mark(node.start_mark)  # type: ignore[assignment]
        if isinstance(node, yaml.ScalarNode):
            _check_plain_scalar(node, path)
            try:
                return self.loader.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError, OverflowError) as exc:  # 2026-02-30 is a ValueError
                raise _Invalid(Problem(_mark(node.start_mark), f"{dotted(path)}: cannot read value "
                                       f"{node.value!r} ({getattr(exc, 'problem', None) or exc})")) from None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
        finally:
            self._active.discard(id(node))
        raise _Invalid(Problem(_mark(node.start_mark), f"unsupported YAML node at {dotted(path)}"))

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[str, Any]:
        explicit = [pair for pair in node.value if pair[0].tag != _MERGE_TAG]
        try:
            self.loader.flatten_mapping(node)  # resolves YAML merge keys (<<: *base)
        except yaml.YAMLError as exc:
            raise _Invalid(Problem(_mark(node.start_mark), f"bad merge key: {exc}")) from None
        # flatten_mapping puts the merged pairs first, in source order: the first source naming
        # a key wins (YAML's rule); explicit keys then override them and must be unique among
        # themselves.
        merged = node.value[:len(node.value) - len(explicit)]
        out: dict[str, Any] = {}
        from_merge: set[str] = set()
        for index, (key_node, value_node) in enumerate(merged + explicit):
            where = _mark(key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Invalid(Problem(where, f"{dotted(path)}: a key must be a plain name, not a "
                                       "list or mapping"))
            try:
                key = self.loader.construct_object(key_node)
            except (yaml.YAMLError, ValueError, OverflowError):  # a key 2026-02-30 is a ValueError
                key = None
            if not isinstance(key, str):
                raise _Invalid(Problem(where, f"{dotted(path)}: key {key_node.value!r} is read as "
                                       f"{type(key).__name__}, not a name",
                                       f"quote it: \"{key_node.value}\""))
            if index < len(merged) and key in out:
                continue
            if key in out and key not in from_merge:
                first = self.keys[path + (key,)]
                inside = f" in {dotted(path)}" if path else ""
                raise _Invalid(Problem(where, f"duplicate key {key!r}{inside} (first at line "
                                       f"{first.line})", "keep one of them"))
            if index < len(merged):
                from_merge.add(key)
            else:
                from_merge.discard(key)
            self.keys[path + (key,)] = where  # type: ignore[assignment]
            out[key] = self.build(value_node, path + (key,))
        return out


_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_PLAIN_FLOAT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_PLAIN_BOOL = ("true", "True", "TRUE", "false", "False", "FALSE")


def _check_plain_scalar(node: yaml.ScalarNode, path: Path_) -> None:
    """Refuse YAML 1.1 spellings whose value surprises: ``0500`` is 320 (octal), ``1:30`` is 90
    (base 60), ``1_000`` drops the ``_``, ``0x10`` is 16, and ``yes``/``on``/``no``/``off`` are
    booleans. A policy means what it plainly says or it is refused."""
    value = node.value
    if node.tag == _INT_TAG and _PLAIN_INT.fullmatch(value) is None:
        raise _Invalid(Problem(_mark(node.start_mark), f"{dotted(path)}: {value!r} is a YAML 1.1 "
                               "integer spelling (octal, hex, base 60 or with _) that does not read "
                               "as it looks", "write a plain decimal (500, not 0500, 1_000 or "
                                               "8:20), or quote it if it is text"))
    if node.tag == _FLOAT_TAG and _PLAIN_FLOAT.fullmatch(value) is None:
        raise _Invalid(Problem(_mark(node.start_mark), f"{dotted(path)}: {value!r} is a YAML 1.1 "
                               "number spelling (base 60 or with _) that does not read as it looks",
                               "write a plain decimal such as 0.25"))
    if node.tag == _BOOL_TAG and value not in _PLAIN_BOOL:
        raise _Invalid(Problem(_mark(node.start_mark), f"{dotted(path)}: {value!r} is read as a "
                               "YAML 1.1 boolean", "write true or false, or quote it if it is text"))


#: libyaml's parser when PyYAML was built with it: about 5x faster, same nodes and marks. Its
#: messages are terser (an undefined alias is not named), so a document it refuses is read again
#: by PyYAML's own parser, whose message is the one shown.
_FastLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TAB_INDENT = re.compile(r"^( *)\t", re.MULTILINE)


def _parse(text: str) -> tuple[Any, _Builder]:
    tab = _TAB_INDENT.search(text)
    if tab is not None:
        line = text.count("\n", 0, tab.start()) + 1
        raise _Invalid(Problem(Mark(line, len(tab.group(1)) + 1), "tab character in indentation",
                               "YAML indents with spaces only; replace the tab with spaces"))
    try:
        return _compose(_FastLoader, text)
    except _Invalid as fast:
        if _FastLoader is yaml.SafeLoader:
            raise
        try:
            _compose(yaml.SafeLoader, text)
        except _Invalid as slow:
            if slow.problem.mark is not None or fast.problem.mark is None:
                raise slow from None
        raise fast from None


def _compose(loader_class: Any, text: str) -> tuple[Any, _Builder]:
    loader = None
    try:
        loader = loader_class(text)
        node = loader.get_single_node()
        builder = _Builder(loader)
        if node is None:
            raise _Invalid(Problem(Mark(1, 1), "the file is empty",
                                   "start with world:, policy_version: and rules:"))
        return builder.build(node), builder
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        context = f" {exc.context}" if exc.context and exc.problem else ""
        raise _Invalid(Problem(_mark(mark), f"not valid YAML: {problem}{context}".strip())) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, a control character)
        raise _Invalid(Problem(_reader_mark(text, exc.position),
                               f"not valid YAML: {exc.reason} (U+{int(exc.character):04X})",
                               "remove it, or write it as an escape inside double quotes")) from None
    except yaml.YAMLError as exc:
        raise _Invalid(Problem(None, f"not valid YAML: {exc}")) from None
    finally:
        if loader is not None:
            loader.dispose()


def _reader_mark(text: str, position: int) -> Mark:
    line = text.count("\n", 0, position) + 1
    return Mark(line, position - (text.rfind("\n", 0, position) + 1) + 1)


# --- mapping pydantic errors back to the source --------------------------------------------------
def _model_at(path: Path_) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``path`` (for "did you mean" suggestions)."""
    model: type[BaseModel] | None = WorldPolicy
    for part in path:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _find_model(field.annotation) if field is not None else None
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    if isinstance(annotation, types.UnionType):
        for arg in annotation.__args__:
            found = _find_model(arg)
            if found is not None:
                return found
    return None


def _suggest(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _document_path(loc: tuple[Any, ...], builder: _Builder) -> Path_:
    """The part of a pydantic ``loc`` that names places in the document (drops union tags)."""
    path: Path_ = ()
    for part in loc:
        candidate = path + (part,)
        if candidate in builder.values or candidate in builder.keys:
            path = candidate
        elif isinstance(part, (str, int)) and not isinstance(part, bool) and path + (part,) not in builder.values:
            # A key pydantic names that the document lacks (missing) or a union member tag.
            if isinstance(part, str) and (part.startswith(("function-", "literal[")) or "[" in part):
                continue
            path = candidate
    return path


def _locate(path: Path_, builder: _Builder, *, prefer_key: bool = False) -> Mark | None:
    probe = path
    while True:
        if prefer_key and probe in builder.keys:
            return builder.keys[probe]
        if probe in builder.values:
            return builder.values[probe]
        if probe in builder.keys:
            return builder.keys[probe]
        if not probe:
            return None
        probe = probe[:-1]


def _problem_from(error: dict[str, Any], builder: _Builder) -> Problem:
    kind = error["type"]
    path = _document_path(tuple(error["loc"]), builder)
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, PolicyProblem):
        full = path + cause.path
        return Problem(_locate(full, builder, prefer_key=True), f"{dotted(full)}: {cause.message}",
                       cause.hint)
    if kind == "extra_forbidden":
        key = path[-1]
        model = _model_at(path[:-1])
        hint = _suggest(str(key), list(model.model_fields)) if model is not None else None
        if hint is None and model is not None:
            hint = "allowed here: " + ", ".join(model.model_fields)
        where = f" in {dotted(path[:-1])}" if path[:-1] else ""
        return Problem(_locate(path, builder, prefer_key=True), f"unknown key {key!r}{where}", hint)
    if kind == "missing":
        where = f"{dotted(path[:-1])}: " if path[:-1] else ""
        return Problem(_locate(path[:-1], builder), f"{where}missing required key {path[-1]!r}")
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    message = message[:1].lower() + message[1:]
    hint = None
    if kind in ("literal_error", "enum") and isinstance(error.get("input"), str):
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = _suggest(error["input"], choices)
    shown = error.get("input")
    if kind == "finite_number":
        hint = "every number in a policy must be finite: no .nan or .inf"
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        message = f"{message}, got {shown!r}"
    return Problem(_locate(path, builder), f"{dotted(path)}: {message}", hint)


# --- public API ----------------------------------------------------------------------------------
def check_policy_text(text: str, *, expected_world: str | None = None) -> tuple[WorldPolicy | None, list[Problem]]:
    """Validate policy source; returns the policy (or ``None``) and every problem, first line first."""
    try:
        data, builder = _parse(text)
    except _Invalid as exc:
        return None, [exc.problem]
    if not isinstance(data, dict):
        return None, [Problem(Mark(1, 1), "the top level must be a mapping of keys (world:, "
                              f"policy_version:, rules:, ...), not a {type(data).__name__}")]
    try:
        policy = WorldPolicy.model_validate(data)
    except ValidationError as exc:
        problems = [_problem_from(e, builder) for e in exc.errors()]
        problems.sort(key=lambda p: (p.mark.line, p.mark.column) if p.mark else (0, 0))
        return None, problems
    if expected_world is not None and policy.world != expected_world:
        return None, [Problem(builder.values.get(("world",)),
                              f"world is {policy.world!r} but the file is named {expected_world!r}",
                              f"rename the file to {policy.world}.yaml or set world: {expected_world}")]
    return policy, []


def load_policy_text(text: str, *, file: str = "<policy>", expected_world: str | None = None) -> WorldPolicy:
    """Parse and validate policy source; the first problem is raised as a located ``PolicyError``."""
    policy, problems = check_policy_text(text, expected_world=expected_world)
    if problems:
        error = problems[0].to_error(file)
        if len(problems) > 1:
            error.details["more_problems"] = [p.to_error(file).one_line() for p in problems[1:]]
        raise error
    assert policy is not None
    return policy


def load_policy_file(path: Path | str) -> WorldPolicy:
    """Read and validate ``worlds/<world>.yaml``; the file name must equal its ``world:``."""
    path = Path(path)
    try:
        text = decode_text(path.read_bytes())
    except FileNotFoundError:
        raise PolicyError("no such file", file=str(path), hint="check the path") from None
    except IsADirectoryError:
        raise PolicyError("is a directory, not a policy file", file=str(path)) from None
    except OSError as exc:
        raise PolicyError(f"cannot read ({exc.strerror})", file=str(path)) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PolicyError("not UTF-8 text", file=str(path), line=line,
                          hint="save the file as UTF-8") from None
    return load_policy_text(text, file=str(path), expected_world=path.stem)
