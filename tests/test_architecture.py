"""Shared code names no variant: the trainer, checkpoints, CLI, ELBO and comparison read what they need from
the classes (through the registry), so adding a program is one new file.

The check parses each file and looks at its code only (names, attributes and string constants; docstrings
and comments are prose): none may be a registered program's name or class name, or a schedule's name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pyro_ddpm.registry import GUIDES, LIKELIHOODS, MODELS, NETWORKS, TIMESTEPS

ROOT = Path(__file__).resolve().parents[1]
SHARED = [
    "pyro_ddpm/train.py",
    "pyro_ddpm/hooks.py",
    "pyro_ddpm/runtime.py",
    "pyro_ddpm/options.py",
    "pyro_ddpm/checkpoint.py",
    "pyro_ddpm/cli.py",
    "pyro_ddpm/elbo.py",
    "pyro_ddpm/compare.py",
    "pyro_ddpm/programs.py",
    "pyro_ddpm/protocol.py",
    "pyro_ddpm/sample.py",
    "pyro_ddpm/importance_weighted.py",
]
SCHEDULES = {"linear", "cosine", "learned"}
# Words that are also a program's name but mean something else in that file (reviewed one by one).
HOMONYMS = {
    "pyro_ddpm/train.py": {"cosine"},  # the learning rate's cosine decay, not the cosine noise schedule
    "pyro_ddpm/protocol.py": {"uniform"},  # the kind of a guide's standard noise, not the timestep sampler
}


def variant_names() -> set[str]:
    names = set(SCHEDULES)
    for registry in (MODELS, GUIDES, LIKELIHOODS, NETWORKS, TIMESTEPS):
        for name in registry.names():
            if ":" in name:  # a class registered by a test or an example
                continue
            names |= {name, registry.resolve(name).__name__}
    return names


def code_words(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.add(node.asname or node.name.split(".")[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words


@pytest.mark.parametrize("path", SHARED)
def test_shared_code_names_no_variant(path):
    found = sorted(code_words(ROOT / path) & variant_names() - HOMONYMS.get(path, set()))
    assert not found, f"{path} names {found}: read them from the classes or the presets table instead"


def test_the_check_sees_a_name_in_code():
    """The check can fail: the models' own package names its classes."""
    assert "GridPosteriorReverseProcess" in code_words(ROOT / "models" / "__init__.py")


# The longest a function of the library may be, in lines from its ``def`` (or first decorator) to its end,
# signature and docstring included: a reader sees it whole on one screen.
MAX_FUNCTION_LINES = 80
LIBRARY = ("pyro_ddpm", "models", "guides")


def function_lengths(path: Path) -> dict[str, int]:
    """``{"Class.method" or "function": lines}`` for every function defined in ``path``, nested ones included."""
    lengths = {}

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                lengths[prefix + child.name] = child.end_lineno - first + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return lengths


@pytest.mark.parametrize("folder", LIBRARY)
def test_no_library_function_is_longer_than_a_screen(folder):
    long = [
        f"{path.relative_to(ROOT)}:{name} ({lines} lines)"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name, lines in function_lengths(path).items()
        if lines > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_length_check_counts_signature_decorators_docstring_and_nested_functions(tmp_path):
    source = tmp_path / "m.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    source.write_text(
        f'@staticmethod\ndef f(\n    a,\n):\n    """Doc."""\n{body}\n\n'
        f"class C:\n    def g(self):\n        def h():\n            return 1\n        return h\n"
    )
    assert function_lengths(source) == {"f": 10, "C.g": 4, "C.g.h": 2}
