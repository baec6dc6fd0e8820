"""Sphinx configuration of the discoloss documentation.

Why Sphinx with MyST Markdown: Sphinx is what the PyTorch ecosystem documents itself with
(PyTorch, torchvision, torchaudio, torchmetrics), its autodoc builds the API reference from
the docstrings the code already carries (one source per text), intersphinx links our signatures
to PyTorch's and Python's own pages, and MyST lets the pages stay Markdown that reads well on
GitHub too (the engine guides, the demo and the benchmark results are plain ``.md`` files).

Build (what ``nox -s docs`` runs; warnings are errors, every reference is checked):

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

The build also fails when a name of a documented module's ``__all__`` has no entry in the API
reference (:func:`check_public_names`), e.g. a new public function without a docstring.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import zlib
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import PycodeError
from sphinx.ext.autodoc.mock import mock
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ``benchmarks`` is a folder of the checkout, not a package

project = "discoloss"
author = "discoloss contributors"
copyright = "2026, discoloss contributors"
release = version = importlib.import_module("discoloss").__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# demo.md is included by demo-page.md (its headings start at level 2); demo/ holds its figures
exclude_patterns = ["_build", "**/README.md", "demo.md", "demo/*.md", "demo/*/*.md"]
nitpicky = True

html_theme = "furo"
html_title = f"discoloss {release}"

# -- MyST -----------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
# Anchors for headings down to ####, so that ``[text](page.md#a-heading)`` links are checked.
myst_heading_anchors = 4

# -- autodoc ---------------------------------------------------------------------------------------
# The adapters import their engine (verl, TRL, OpenRLHF and what those pull in). The docs
# environment does not install the engines: autodoc sees stand-ins for them, so the adapters'
# docstrings are rendered without a GPU stack.
autodoc_mock_imports = [
    "verl",
    "trl",
    "openrlhf",
    "ray",
    "deepspeed",
    "transformers",
    "accelerate",
    "datasets",
    "omegaconf",
    "hydra",
    "tensordict",
    "vllm",
]


def _verl_registry_stand_in() -> None:
    """Stand-in for verl's ``core_algos`` registries (verl itself is mocked, see above).

    ``import discoloss.adapters.verl`` registers the adapter in verl's registries and refuses a
    registry entry that is not its own, which is what a mocked registry returns. These two
    plain modules give it empty registries; the rest of verl stays mocked.
    """
    import types

    ppo = types.ModuleType("verl.trainer.ppo")
    ppo.__path__ = []
    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    core_algos.ADV_ESTIMATOR_REGISTRY = {}
    core_algos.POLICY_LOSS_REGISTRY = {}

    def registrar(registry: dict[str, object]):  # noqa: ANN202
        return lambda name: lambda fn: registry.setdefault(name, fn)

    core_algos.register_adv_est = registrar(core_algos.ADV_ESTIMATOR_REGISTRY)
    core_algos.register_policy_loss = registrar(core_algos.POLICY_LOSS_REGISTRY)
    ppo.core_algos = core_algos
    sys.modules.setdefault("verl.trainer.ppo", ppo)
    sys.modules.setdefault("verl.trainer.ppo.core_algos", core_algos)


_verl_registry_stand_in()
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"


def _type_checking_names() -> None:
    """``discoloss.loss`` and ``discoloss.accumulation`` import ``ProcessGroup`` for type
    checkers only; without it autodoc leaves the whole signature unevaluated (``'Score'``
    instead of the Literal of its values)."""
    import torch.distributed

    import discoloss.accumulation
    import discoloss.loss

    for module in (discoloss.loss, discoloss.accumulation):
        if not hasattr(module, "ProcessGroup") and hasattr(torch.distributed, "ProcessGroup"):
            module.ProcessGroup = torch.distributed.ProcessGroup


_type_checking_names()
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- intersphinx -----------------------------------------------------------------------------------
# The build runs without network access (CI has none), so the inventories are small local files
# written below from the names our signatures use; the links point at the real pages (``$``
# in a URI stands for the name).
INVENTORIES = Path(__file__).parent / "_build" / "inventories"

PYTHON_OBJECTS = {
    "typing.Any": ("py:data", "library/typing.html#$"),
    "typing.Literal": ("py:data", "library/typing.html#$"),
    "typing.NamedTuple": ("py:class", "library/typing.html#$"),
    "collections.abc.Callable": ("py:class", "library/collections.abc.html#$"),
    "collections.abc.Iterable": ("py:class", "library/collections.abc.html#$"),
    "collections.abc.Iterator": ("py:class", "library/collections.abc.html#$"),
    "collections.abc.Mapping": ("py:class", "library/collections.abc.html#$"),
    "collections.abc.Sequence": ("py:class", "library/collections.abc.html#$"),
    "pathlib.Path": ("py:class", "library/pathlib.html#$"),
    "argparse.ArgumentParser": ("py:class", "library/argparse.html#$"),
    "argparse.Namespace": ("py:class", "library/argparse.html#$"),
    "ValueError": ("py:exception", "library/exceptions.html#$"),
    "TypeError": ("py:exception", "library/exceptions.html#$"),
    "RuntimeError": ("py:exception", "library/exceptions.html#$"),
    "object": ("py:class", "library/functions.html#$"),
    "int": ("py:class", "library/functions.html#$"),
    "float": ("py:class", "library/functions.html#$"),
    "bool": ("py:class", "library/functions.html#$"),
    "str": ("py:class", "library/stdtypes.html#$"),
    "bytes": ("py:class", "library/stdtypes.html#$"),
    "dict": ("py:class", "library/stdtypes.html#$"),
    "list": ("py:class", "library/stdtypes.html#$"),
    "tuple": ("py:class", "library/stdtypes.html#$"),
    "None": ("py:data", "library/constants.html#$"),
}
TORCH_OBJECTS = {
    "torch.Tensor": ("py:class", "tensors.html#$"),
    "torch.dtype": ("py:class", "tensor_attributes.html#$"),
    "torch.device": ("py:class", "tensor_attributes.html#$"),
    "torch.Generator": ("py:class", "generated/torch.Generator.html#$"),
    "torch.nn.Module": ("py:class", "generated/torch.nn.Module.html#$"),
    "torch.distributed.ProcessGroup": ("py:class", "distributed.html"),
    "torch.distributed.distributed_c10d.ProcessGroup": ("py:class", "distributed.html"),
    "torch.no_grad": ("py:class", "generated/torch.no_grad.html#$"),
}
NUMPY_OBJECTS = {
    "numpy.ndarray": ("py:class", "reference/generated/numpy.ndarray.html#$"),
}


def write_inventory(
    path: Path, project: str, version: str, objects: dict[str, tuple[str, str]]
) -> str:
    """Write a Sphinx (version 2) object inventory and return its path."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, (role, uri) in sorted(objects.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + zlib.compress(body.encode()))
    return str(path)


intersphinx_mapping = {
    "python": (
        "https://docs.python.org/3",
        write_inventory(INVENTORIES / "python.inv", "Python", "3", PYTHON_OBJECTS),
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable",
        write_inventory(INVENTORIES / "torch.inv", "PyTorch", "2", TORCH_OBJECTS),
    ),
    "numpy": (
        "https://numpy.org/doc/stable",
        write_inventory(INVENTORIES / "numpy.inv", "NumPy", "2", NUMPY_OBJECTS),
    ),
}

# Types of the engines (mocked above): no target.
nitpick_ignore_regex = [
    ("py:.*", r"(verl|trl|openrlhf|ray|deepspeed|transformers|datasets|omegaconf)(\..*)?"),
]
# Internal modules and helpers that public docstrings mention; they are not part of the API.
nitpick_ignore = [
    ("py:func", "clipped_ratio_scores"),
    ("py:mod", "patch"),
    ("py:mod", "discoloss.analysis.cli"),
    ("py:mod", "discoloss.adapters.verl.encoding"),
]

# -- the API reference must cover every public name ----------------------------------------------
#: Modules whose ``__all__`` the API reference documents in full.
API_MODULES = (
    "discoloss",
    "discoloss.accumulation",
    "discoloss.baselines",
    "discoloss.analysis",
    "discoloss.constraints",
    "discoloss.adapters.verl",
    "discoloss.adapters.openrlhf",
    "discoloss.adapters.trl",
)

_logger = logging.getLogger(__name__)


def check_public_names(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn (an error under ``-W``) for each public name the API reference does not document."""
    documented = set(env.get_domain("py").objects)
    for module in API_MODULES:
        if module not in sys.modules:  # autodoc imported it, with the engines mocked
            with mock(app.config.autodoc_mock_imports):
                importlib.import_module(module)
        names = getattr(sys.modules[module], "__all__", [])
        if not names:
            _logger.warning("API reference: %s has no __all__", module)
        for name in names:
            if f"{module}.{name}" not in documented:
                _logger.warning(
                    "API reference: public name %s.%s is not documented (no docstring or "
                    "doc-comment, or its module is missing from docs/api/)",
                    module,
                    name,
                )


# -- docstring conventions of the code base ------------------------------------------------------
# NamedTuple results describe their fields in the class docstring, one ``field: text`` entry
# each (continuation lines indented), where autodoc would show "Alias for field number N" for
# each field: the entries move to the fields' own entries. Constants re-exported by a package
# keep the ``#:`` doc-comment of the module that defines them.

_FIELD = re.compile(r"^(?P<names>\w+(?:, \w+)*): (?P<text>.*)$")
_FIELD_DOCS: dict[str, list[str]] = {}


def _move_field_entries(class_name: str, lines: list[str], fields: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    entry: list[str] | None = None
    for line in lines:
        match = _FIELD.match(line)
        if match and all(n in fields for n in match["names"].split(", ")):
            entry = [match["text"]]
            for field_name in match["names"].split(", "):
                _FIELD_DOCS[f"{class_name}.{field_name}"] = entry
        elif entry is not None and line.startswith(" "):
            entry.append(line.strip())
        else:
            entry = None
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return out


def _doc_comment(module_name: str, name: str) -> list[str]:
    """The ``#:`` doc-comment of ``name`` in ``module_name`` or one of its submodules."""
    candidates = [module_name] + sorted(m for m in sys.modules if m.startswith(module_name + "."))
    for modname in candidates:
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            continue
        if ("", name) in docs:
            return list(docs[("", name)])
    return []


def process_docstring(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    fields = getattr(obj, "_fields", None)
    if what == "class" and isinstance(fields, tuple):
        lines[:] = _move_field_entries(name, lines, fields)
    elif what == "attribute" and lines and lines[0].startswith("Alias for field number"):
        lines[:] = _FIELD_DOCS.get(name, lines)
    elif what == "data":
        module_name, _, attr = name.rpartition(".")
        try:
            own = ("", attr) in ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except PycodeError:
            own = False
        if not own:  # re-exported: autodoc found nothing, or the docstring of the value's type
            lines[:] = _doc_comment(module_name, attr)
            if not lines:
                _logger.warning("API reference: %s has no doc-comment (#: above it)", name)


def process_signature(
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """NamedTuples: the field names (their types are in the fields' entries)."""
    fields = getattr(obj, "_fields", None)
    if what == "class" and isinstance(fields, tuple):
        return f"({', '.join(fields)})", return_annotation
    return None


def skip_member(
    app: Sphinx, what: str, name: str, obj: object, skip: bool, options: object
) -> bool | None:
    """Keep the public methods and properties of documented classes, docstring or not (their
    signature is the documentation)."""
    if what == "class" and skip and not name.startswith("_"):
        if inspect.isfunction(obj) or isinstance(obj, property):
            return False
    return None


def setup(app: Sphinx) -> None:
    app.connect("env-check-consistency", check_public_names)
    app.connect("autodoc-process-docstring", process_docstring)
    app.connect("autodoc-process-signature", process_signature)
    app.connect("autodoc-skip-member", skip_member)
