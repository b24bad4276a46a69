"""The API reference renders: one docstring style (Google sections, mkdocstrings
cross-references), one exception per ``Raises`` entry, defaults shown as values, and no
internal references in the pages users read. ``mkdocs build --strict`` (CI) checks that
every cross-reference resolves; these checks cover what it cannot see (docstrings of
modules the site does not render, and text that renders but reads wrong)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "kvswitch"
SOURCES = sorted([*SRC.rglob("*.py"), *SRC.rglob("*.pyi")])

SPHINX_ROLE = re.compile(r":(?:meth|class|func|attr|mod|data|exc|obj|ref):`")
EXCEPTION = r"\b[\w.]*(?:Error|Exception|Exit|Interrupt|Warning)"
# An entry line of a Raises section: "    ValueError: ..." (exactly one name, then a colon).
RAISES_ENTRY = re.compile(rf"^\s+({EXCEPTION})\s*:\s")
# A second exception inside one entry: "... . ValueError: ...", "TypeError/ValueError:",
# "TypeError, ValueError:".
SECOND_EXCEPTION = re.compile(rf"(?:[.;)]\s+{EXCEPTION}\s*:|{EXCEPTION}\s*[/,]\s*{EXCEPTION}\s*:)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_no_sphinx_roles_in_docstrings():
    hits = [f"{_rel(p)}:{i}: {line.strip()}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines(), 1) if SPHINX_ROLE.search(line)]
    assert not hits, "Sphinx roles render raw; write [`name`][] instead:\n" + "\n".join(hits)


def _raises_sections(text: str):
    """(line number, [lines]) of every Google-style Raises section."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)Raises:\s*$", line)
        if not m:
            continue
        indent, body = len(m.group(1)), []
        for later in lines[i + 1:]:
            if not later.strip() or len(later) - len(later.lstrip()) <= indent:
                break
            body.append(later)
        yield i + 1, body


def test_one_exception_per_raises_entry():
    bad = []
    for path in SOURCES:
        for lineno, body in _raises_sections(path.read_text()):
            entry_indent = len(body[0]) - len(body[0].lstrip()) if body else 0
            for k, line in enumerate(body):
                if len(line) - len(line.lstrip()) == entry_indent and not RAISES_ENTRY.match(line):
                    bad.append(f"{_rel(path)}:{lineno + 1 + k}: not 'Name: description': "
                               f"{line.strip()}")
                if SECOND_EXCEPTION.search(line):
                    bad.append(f"{_rel(path)}:{lineno + 1 + k}: two exceptions in one entry: "
                               f"{line.strip()}")
    assert not bad, "\n".join(bad)


def test_the_raises_check_catches_a_shared_entry():
    shared = '"""Do it.\n\n    Raises:\n        TypeError: bad type. ValueError: bad value.\n"""'
    body = next(_raises_sections(shared))[1]
    assert SECOND_EXCEPTION.search(body[0])
    assert SECOND_EXCEPTION.search("        TypeError/ValueError: bad")
    assert not SECOND_EXCEPTION.search("        ValueError: sizes that do not add up.")


# Parameters whose default is written as a value (so the API reference shows it), next to
# the module constant other code uses: the two must agree.
DEFAULTS = [
    ("allocator.py", "BlockGroupAllocator.__init__", "initial_group_blocks",
     "DEFAULT_INITIAL_GROUP_BLOCKS"),
    ("manager.py", "SwapManager.__init__", "compaction_max_moved",
     "DEFAULT_COMPACTION_MAX_MOVED"),
    ("adapters/vllm/manager.py", "KVSwitchOffloadingManager.__init__", "initial_group_chunks",
     "DEFAULT_INITIAL_GROUP_CHUNKS"),
]


def _function(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    scope: list[ast.stmt] = tree.body
    *outer, name = qualname.split(".")
    for part in outer:
        scope = next(n for n in scope if isinstance(n, ast.ClassDef) and n.name == part).body
    return next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)


@pytest.mark.parametrize(("module", "function", "param", "constant"), DEFAULTS)
def test_documented_defaults_are_values_equal_to_their_constant(module, function, param,
                                                                 constant):
    tree = ast.parse((SRC / module).read_text())
    args = _function(tree, function).args
    params = [*args.posonlyargs, *args.args]
    defaults = dict(zip([a.arg for a in params[len(params) - len(args.defaults):]],
                        args.defaults, strict=True))
    defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                     if d is not None})
    default = defaults[param]
    assert isinstance(default, ast.Constant), f"{function}({param}=...) is not a value"
    value = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == constant for t in n.targets))
    assert default.value == ast.literal_eval(value)


def test_signatures_show_values_not_constant_names():
    # A default that is a NAME in a public signature renders as that name in the reference.
    offenders = []
    for path in SOURCES:
        if "bench" in path.parts or path.name == "cli.py":  # not in the API reference
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") or (
                    isinstance(node, ast.FunctionDef) and node.name == "__init__"):
                for d in [*node.args.defaults, *node.args.kw_defaults]:
                    if isinstance(d, ast.Name) and d.id.isupper():
                        offenders.append(f"{_rel(path)}:{node.lineno}: {node.name}(... = {d.id})")
    assert not offenders, "\n".join(offenders)


USER_DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
INTERNAL = re.compile(r"\bissues? #?\d+(?!\.?\d|x)|\bthe team.s\b|(?-i:\bDESIGN\.md)|\bred-team\b|"
                      r"\bhelper \d+\b", re.IGNORECASE)


def test_user_docs_name_no_internal_tracker_or_files():
    hits = [f"{_rel(p)}:{i}: {m.group(0)}" for p in USER_DOCS
            for i, line in enumerate(p.read_text().splitlines(), 1)
            for m in INTERNAL.finditer(line)]
    assert not hits, "\n".join(hits)
