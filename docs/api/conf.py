"""Sphinx configuration of the API reference, built from the package's docstrings.

Build: ``pip install -e ".[docs]" && sphinx-build -W -b html docs/api docs/_build/html``.
"""

import importlib
import inspect

import pyro_ddpm

project = "pyro-ddpm"
author = "pyro-ddpm contributors"
copyright = "pyro-ddpm contributors"
version = release = pyro_ddpm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# The docstrings are reStructuredText with ``:param:`` fields, as in Pyro. Each ``automodule`` names
# ``:members:`` itself: a ``members`` default here would override the pages' explicit member lists.
autodoc_default_options = {
    "undoc-members": True,  # as Pyro's reference: every public object, a signature where no docstring
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
add_module_names = False
# The optional extras (diffusers, torchdiffeq) are imported inside the functions that use them.
autodoc_inherit_docstrings = False  # a method shows its own docstring, not torch's or a base class's

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"pyro-ddpm {release} API reference"


def _exported_bases(app, name, obj, options, bases):
    """Name a base class the way the pages document it: ``pyro_ddpm.models.ReverseProcess``, not the
    submodule that defines it (``pyro_ddpm.models.reverse_process.ReverseProcess``), so that it links."""
    for i, base in enumerate(bases):
        module = getattr(base, "__module__", "")
        for package in ("pyro_ddpm.models", "pyro_ddpm.guides"):
            exported = getattr(importlib.import_module(package), getattr(base, "__name__", ""), None)
            if module.startswith(package + ".") and exported is base:
                bases[i] = f":py:class:`~{package}.{base.__name__}`"


def _constructor_signature(app, what, name, obj, options, signature, return_annotation):
    """The constructor's parameters for a class whose ``__new__(cls, *args, **kwargs)`` (the programs'
    completeness check) hides them from autodoc: Python's own ``inspect.signature`` reads ``__init__``."""
    if what != "class" or signature != "(*args, **kwargs)":
        return None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=plain, return_annotation=inspect.Signature.empty)), return_annotation


def setup(app):
    app.connect("autodoc-process-bases", _exported_bases)
    app.connect("autodoc-process-signature", _constructor_signature)
