"""The codebase rules a reviewer would otherwise check by hand, read from the source with ast.

- a function longer than ``MAX_FUNCTION_LINES`` says why in its docstring,
  in a paragraph that starts "Long because";
- every exception class defined in ``testbed/`` is in the tree drawn in
  ``testbed/errors.py``'s docstring, under the parent the drawing gives it
  (or is one of the exceptions that docstring names with its module);
- the package raises no bare built-in (``raise ValueError(...)``): each
  error is a class in that tree, "(also ValueError)" where callers catch
  the built-in.

Each test lists every offender as ``path:line`` so one run shows all of them.
"""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "testbed"
ERRORS = PACKAGE / "errors.py"

#: Longer than this and the docstring must say why (project convention).
MAX_FUNCTION_LINES = 60
#: The built-ins the package must not raise bare: each has a class in the tree.
BARE_BUILTINS = frozenset({"ValueError", "KeyError", "RuntimeError", "TypeError", "Exception"})
#: The convention's marker: a docstring paragraph starting with these words.
LONG_BECAUSE = re.compile(r"(?:\A|\n\s*\n)\s*Long because\b")
#: How errors.py's docstring names an exception that stays outside the tree.
OUTSIDE_TREE = re.compile(r"``([\w/]+\.py)``'s ``(\w+)``")


@dataclass(frozen=True)
class Source:
    """One module of the package, parsed."""

    path: Path
    tree: ast.Module

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    def where(self, node: ast.stmt | ast.expr) -> str:
        return f"{self.name}:{node.lineno}"


def _sources() -> list[Source]:
    paths = sorted(PACKAGE.rglob("*.py"))
    assert paths, f"no Python files under {PACKAGE}: the walk is broken"
    return [Source(path, ast.parse(path.read_text(), filename=str(path))) for path in paths]


SOURCES = _sources()


def _in_source_order(tree: ast.Module) -> list[ast.AST]:
    """Every node of a module in source order (ast.walk alone is breadth-first)."""
    nodes = [node for node in ast.walk(tree) if hasattr(node, "lineno")]
    return sorted(nodes, key=lambda node: (node.lineno, node.col_offset))  # type: ignore[attr-defined]


def _function_length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the last line of the body (decorators not counted)."""
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def long_functions(sources: list[Source]) -> list[str]:
    """Every function over the limit whose docstring has no "Long because" paragraph."""
    found = []
    for source in sources:
        for node in _in_source_order(source.tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = _function_length(node)
            if length <= MAX_FUNCTION_LINES:
                continue
            if LONG_BECAUSE.search(ast.get_docstring(node) or ""):
                continue
            found.append(f"{source.where(node)}: {node.name} is {length} lines")
    return found


def _base_names(node: ast.ClassDef) -> list[str]:
    """The bases' names as written, ``errors.GuestError`` read as ``GuestError``."""
    names = []
    for base in node.bases:
        if isinstance(base, ast.Name):
            names.append(base.id)
        elif isinstance(base, ast.Attribute):
            names.append(base.attr)
    return names


_BUILTIN_EXCEPTIONS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)


@dataclass(frozen=True)
class ExceptionClass:
    """An exception class found in the package's source."""

    source: Source
    node: ast.ClassDef

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def bases(self) -> list[str]:
        return _base_names(self.node)


def exception_classes(sources: list[Source]) -> list[ExceptionClass]:
    """Classes that derive, directly or through the package's own classes, from an exception."""
    classes = [
        ExceptionClass(source, node)
        for source in sources
        for node in _in_source_order(source.tree)
        if isinstance(node, ast.ClassDef)
    ]
    exceptions: set[str] = set(_BUILTIN_EXCEPTIONS)
    # Grow the set until it stops: a class is an exception if a base is one.
    while True:
        grown = {c.name for c in classes if any(b in exceptions for b in c.bases)}
        if grown <= exceptions:
            break
        exceptions |= grown
    return [c for c in classes if any(b in exceptions for b in c.bases)]


def drawn_tree(docstring: str) -> dict[str, str | None]:
    """The drawing in errors.py's docstring as {class: parent} (the root's parent is None).

    The drawing is the indented block after the first ``::``.  Its first line
    is the root; every other line is ``... +-- Name  comment``, the column of
    ``+--`` gives the depth, and a class's parent is the nearest line above
    it one level up.
    """
    lines = docstring.splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip().endswith("::")), None)
    assert start is not None, "errors.py's docstring has no '::' block: where is the tree?"
    tree: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name)
    for line in lines[start + 1 :]:
        if not line.strip():
            if tree:
                break  # the blank line after the drawing ends it
            continue
        match = re.match(r"^\s+(?:[ |]*\+-- )?(\w+)", line)
        assert match is not None, f"cannot read this line of the drawing: {line!r}"
        column = match.start(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        tree[match.group(1)] = stack[-1][1] if stack else None
        stack.append((column, match.group(1)))
    return tree


def _errors_docstring() -> str:
    doc = ast.get_docstring(ast.parse(ERRORS.read_text()))
    assert doc, f"{ERRORS} has no docstring: where is the tree?"
    return doc


def classes_outside_tree(sources: list[Source]) -> list[str]:
    """Exception classes not in the drawing, or drawn under another parent than their base."""
    doc = _errors_docstring()
    tree = drawn_tree(doc)
    allowed = {(path, name) for path, name in OUTSIDE_TREE.findall(doc)}
    found = []
    for cls in exception_classes(sources):
        module = cls.source.path.relative_to(PACKAGE).as_posix()
        if (module, cls.name) in allowed:
            continue
        if cls.name not in tree:
            found.append(f"{cls.source.where(cls.node)}: {cls.name} is not in errors.py's tree")
            continue
        parent = tree[cls.name]
        package_bases = [b for b in cls.bases if b in tree]
        actual = package_bases[0] if package_bases else None
        if parent != actual:
            found.append(
                f"{cls.source.where(cls.node)}: {cls.name} derives from {actual} "
                f"but errors.py draws it under {parent}"
            )
    return found


def _raised_name(node: ast.Raise) -> str | None:
    """The class a ``raise`` names: ``raise X`` and ``raise X(...)`` both give ``X``."""
    exc = node.exc
    if isinstance(exc, ast.Call):
        exc = exc.func
    return exc.id if isinstance(exc, ast.Name) else None


def bare_builtin_raises(sources: list[Source]) -> list[str]:
    """Every ``raise`` of a built-in the tree has a class for."""
    found = []
    for source in sources:
        for node in _in_source_order(source.tree):
            if isinstance(node, ast.Raise) and _raised_name(node) in BARE_BUILTINS:
                found.append(f"{source.where(node)}: raise {_raised_name(node)}")
    return found


def _report(offenders: list[str], rule: str) -> str:
    return f"{len(offenders)} {rule}:\n  " + "\n  ".join(offenders)


def test_long_functions_say_why() -> None:
    offenders = long_functions(SOURCES)
    assert offenders == [], _report(
        offenders, f'functions over {MAX_FUNCTION_LINES} lines without a "Long because" paragraph'
    )


def test_every_exception_class_is_in_the_drawn_tree() -> None:
    offenders = classes_outside_tree(SOURCES)
    assert offenders == [], _report(offenders, "exception classes outside errors.py's tree")


def test_the_package_raises_no_bare_builtin() -> None:
    offenders = bare_builtin_raises(SOURCES)
    assert offenders == [], _report(offenders, "bare built-in raises")


# The checkers themselves, on made-up sources, so a broken walk cannot pass silently.


def _fake(text: str, name: str = "testbed/fake.py") -> list[Source]:
    return [Source(ROOT / name, ast.parse(text))]


def test_a_long_function_is_found_unless_its_docstring_says_why() -> None:
    body = "    x = 1\n" * MAX_FUNCTION_LINES
    silent = f'def f():\n    """Does f."""\n{body}'
    explained = f'def f():\n    """Does f.\n\n    Long because it must.\n    """\n{body}'
    assert long_functions(_fake(silent)) == [
        f"testbed/fake.py:1: f is {MAX_FUNCTION_LINES + 2} lines"
    ]
    assert long_functions(_fake(explained)) == []
    # The marker must start a paragraph, not hide in a sentence.
    buried = f'def f():\n    """Does f. Long because it must."""\n{body}'
    assert len(long_functions(_fake(buried))) == 1


def test_the_drawing_is_read_with_its_parents() -> None:
    tree = drawn_tree(_errors_docstring())
    assert tree["TestbedError"] is None
    assert tree["LocalProtocolError"] == "ProtocolError"
    assert tree["FrameDecodeError"] == "RemoteProtocolError"
    assert tree["TransportError"] == "TestbedError"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("class Stray(ValueError):\n    pass\n", ["Stray is not in"]),
        ("class A(ValueError): pass\nclass B(A): pass\n", ["A is not in", "B is not in"]),
        (
            "class TestbedError(Exception): pass\n"
            "class ProtocolError(TestbedError): pass\n"
            "class GuestError(ProtocolError): pass\n",
            ["GuestError derives from ProtocolError but errors.py draws it under TestbedError"],
        ),
        ("class NotAnError: pass\n", []),
    ],
    ids=["direct", "through-a-package-class", "wrong-parent", "not-an-exception"],
)
def test_an_exception_class_outside_the_tree_is_found(text: str, expected: list[str]) -> None:
    found = classes_outside_tree(_fake(text))
    assert len(found) == len(expected)
    for line, part in zip(found, expected, strict=True):
        assert part in line


def test_the_documented_exceptions_are_allowed_outside_the_tree() -> None:
    allowed = OUTSIDE_TREE.findall(_errors_docstring())
    assert ("broker/gate.py", "_Refused") in allowed
    assert (
        classes_outside_tree(_fake("class _Refused(Exception): pass\n", "testbed/broker/gate.py"))
        == []
    )
    assert len(classes_outside_tree(_fake("class _Refused(Exception): pass\n"))) == 1


def test_bare_builtin_raises_are_found() -> None:
    text = "raise ValueError('x')\nraise KeyError\nraise OSError(2, 'x')\nraise\n"
    assert bare_builtin_raises(_fake(text)) == [
        "testbed/fake.py:1: raise ValueError",
        "testbed/fake.py:2: raise KeyError",
    ]
