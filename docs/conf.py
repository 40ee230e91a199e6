"""Sphinx configuration for the trioflow documentation.

Build with ``nox -s docs`` (``sphinx-build -W --keep-going -b html docs
docs/_build/html``): every warning is an error. Nothing here touches the
network: there is no intersphinx, so names from Trio and the standard library
render as code without links.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trioflow  # noqa: E402

logger = logging.getLogger(__name__)

# -- project ---------------------------------------------------------------------

project = "trioflow"
author = "trioflow developers"
copyright = "trioflow developers"
release = trioflow.__version__
version = ".".join(release.split(".")[:2])

# -- general ---------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # its docstring hook is replaced in setup(): see napoleon_sections
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build"]
default_role = "py:obj"
nitpicky = False
pygments_style = "friendly"

# -- autodoc and napoleon (Google style docstrings) ------------------------------

autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: no second description of a member
napoleon_use_rtype = False
napoleon_custom_sections = ["Cancellation"]

# -- HTML ------------------------------------------------------------------------

html_theme = "furo"
html_title = f"trioflow {release}"
html_static_path: list[str] = []

# -- the reference: modules and the top-level names ------------------------------

# The modules with a page in reference/, each documented with automodule. A
# top-level name (``trioflow.X``) is documented once, in the first of these
# modules that exports it (its ``__all__``); ``trioflow.X`` references resolve
# to that description.
DOCUMENTED_MODULES = [
    "trioflow.events",
    "trioflow.bus",
    "trioflow.history",
    "trioflow.progress",
    "trioflow.supervise",
    "trioflow.tools",
    "trioflow.builtin",
    "trioflow.models",
    "trioflow.models._claude",
    "trioflow.models._openai",
    "trioflow.models._scripted",
    "trioflow.agent",
    "trioflow.executor",
    "trioflow.handle",
    "trioflow.demo",
    "trioflow.sse",
    "trioflow.protocol",
    "trioflow.testing",
    "trioflow.cli._console",
    "trioflow.cli",
    "trioflow.services",
    "trioflow.settings",
    "trioflow.cache",
    "trioflow.telemetry",
    "trioflow.recording",
    "trioflow.patterns",
    "trioflow.web",
    "trioflow.client",
]


def documented_name(obj: object, name: str) -> str | None:
    """Where the reference describes ``obj`` (exported as ``name``), or None."""
    for module_name in DOCUMENTED_MODULES:
        module = importlib.import_module(module_name)
        if name in getattr(module, "__all__", ()) and getattr(module, name, None) is obj:
            return f"{module_name}.{name}"
    return None


def summary(obj: object, target: str) -> str:
    """The first line of what the reference says about ``obj``, documented as ``target``."""
    if isinstance(obj, trioflow.Tool):
        doc: str | None = obj.description
    elif inspect.isclass(obj) or inspect.isroutine(obj):
        doc = inspect.getdoc(obj)
    else:  # data: the docstring after its assignment in the source
        module, _, name = target.rpartition(".")
        doc = "\n".join(ModuleAnalyzer.for_module(module).find_attr_docs().get(("", name), []))
    if not doc or not doc.strip():
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


class TopLevelNames(SphinxDirective):
    """``.. trioflow-top-level-names::``: a table of ``trioflow.__all__``, linked to the reference.

    Warns (so the build fails) about a public name that no reference page
    documents: add its module to DOCUMENTED_MODULES and reference/.
    """

    def run(self) -> list[nodes.Node]:
        by_module: dict[str, list[str]] = {m: [] for m in DOCUMENTED_MODULES}
        for name in sorted(trioflow.__all__, key=str.lower):
            if name.startswith("__"):
                continue
            obj = getattr(trioflow, name)
            target = documented_name(obj, name)
            if target is None:
                logger.warning(
                    "trioflow.%s is not documented: add its module to DOCUMENTED_MODULES "
                    "in docs/conf.py and a page to docs/reference/",
                    name,
                    location=self.get_location(),
                )
                continue
            module = target.rpartition(".")[0]
            by_module[module].append(
                f"   * - :py:obj:`{name} <{target}>`\n     - {summary(obj, target)}"
            )
        lines: list[str] = []
        for module, rows in by_module.items():
            if rows:
                lines += [
                    f".. currentmodule:: {module}",  # for the references in the summaries
                    "",
                    f".. rubric:: From :mod:`{module}`",
                    "",
                    ".. list-table::",
                    "   :widths: 30 70",
                    "",
                    *"\n".join(rows).splitlines(),
                    "",
                ]
        lines += [".. currentmodule:: trioflow", ""]
        container = nodes.container()
        self.state.nested_parse(StringList(lines), self.content_offset, container)
        return container.children


def rst_escape(text: str) -> str:
    """``text`` with reST's inline markup characters escaped, to show as written."""
    for char in "\\*`_|":
        text = text.replace(char, "\\" + char)
    return text


class ToolDescription(SphinxDirective):
    """``.. trioflow-tool:: module.name``: describe a :class:`trioflow.Tool` object.

    A tool is an object, not a function, so autodoc does not describe it: this
    shows what the model is told, its name, description and input schema.
    """

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        module_name, _, attr = self.arguments[0].rpartition(".")
        tool = getattr(importlib.import_module(module_name), attr)
        assert isinstance(tool, trioflow.Tool), f"{self.arguments[0]} is not a Tool"
        schema = json.dumps(tool.input_schema, indent=2)
        timeout = "none" if tool.timeout is None else f"{tool.timeout} s"
        lines = [
            f".. py:data:: {attr}",
            f"   :module: {module_name}",
            "   :type: trioflow.tools.Tool",
            "",
            f"   The ``{tool.name}`` tool (time limit: {timeout}). What the model is told:",
            "",
            *("   " + rst_escape(line) for line in tool.description.splitlines()),
            "",
            "   Its input schema:",
            "",
            "   .. code-block:: json",
            "",
            *("      " + line for line in schema.splitlines()),
            "",
        ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines), self.content_offset, container)
        return container.children


_MISSING = object()
_PLAIN_VALUES = (int, float, str, bytes, bool, type(None), tuple)


def lookup(dotted: str) -> object:
    """The object a dotted name stands for (module, then attributes), or ``_MISSING``."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return _MISSING
        return obj
    return _MISSING


def documented_objects(app: Sphinx, env: BuildEnvironment) -> dict[int, str]:
    """``id(object)`` -> the full name under which the reference describes it.

    Built once per build, when the first reference is resolved (all pages are
    read by then), and kept on the application, not in the pickled environment.
    """
    cache: dict[int, str] | None = getattr(app, "_trioflow_documented", None)
    if cache is None:
        cache = {}
        keep = []  # keep the objects alive, so that their ids stay theirs
        for fullname, entry in env.get_domain("py").objects.items():
            if entry.aliased or not fullname.startswith("trioflow."):
                continue
            obj = lookup(fullname)
            if obj is _MISSING or type(obj) in _PLAIN_VALUES:
                continue
            keep.append(obj)
            cache.setdefault(id(obj), fullname)
        app._trioflow_documented = cache  # type: ignore[attr-defined]
        app._trioflow_keep = keep  # type: ignore[attr-defined]
    return cache


def resolve_elsewhere(
    app: Sphinx, env: BuildEnvironment, node: Any, contnode: nodes.Element
) -> nodes.Element | None:
    """Resolve a reference to an object that the reference describes under another name.

    Docstrings name objects the way their module sees them: by the public
    name (``:class:`trioflow.EventBus```), or by a name the module imported
    (``:class:`FlowEvent``` in :mod:`trioflow.bus`). The reference describes
    each object once, in its own module (``trioflow.bus.EventBus``). Find the
    object the name stands for and link to its description; a name whose
    last parts are instance attributes links through its owner
    (``AnthropicServer.requests``).
    """
    if node.get("refdomain") != "py":
        return None
    target: str = node.get("reftarget", "")
    module, cls = node.get("py:module"), node.get("py:class")
    if target.startswith("trioflow."):
        candidates = [target]
    elif module:
        candidates = [f"{module}.{cls}.{target}"] if cls else []
        candidates.append(f"{module}.{target}")
        owner = lookup(f"{module}.{cls}") if cls else _MISSING
        home = getattr(owner, "__module__", None)
        if isinstance(home, str) and home != module:  # documented away from its module
            candidates.append(f"{home}.{target}")
    else:
        return None
    documented = documented_objects(app, env)
    domain = env.get_domain("py")
    for candidate in candidates:
        parts = candidate.split(".")
        for split in range(len(parts), 1, -1):
            obj = lookup(".".join(parts[:split]))
            if obj is _MISSING or type(obj) in _PLAIN_VALUES:
                continue
            name = documented.get(id(obj))
            if name is None:
                continue
            new_target = ".".join([name, *parts[split:]])
            new_node = node.deepcopy()
            new_node["reftarget"] = new_target
            resolved: nodes.Element | None = domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], new_target, new_node, contnode
            )
            if resolved is not None:
                return resolved
            break
    return None


def drop_object_base(app: Sphinx, name: str, obj: object, options: Any, bases: list[type]) -> None:
    """Show the bases that say something: not ``object``."""
    bases[:] = [b for b in bases if b is not object]


def drop_empty_bases(app: Sphinx, doctree: nodes.document) -> None:
    """Remove the "Bases:" line of a class whose only base was ``object``."""
    for paragraph in list(doctree.findall(nodes.paragraph)):
        if paragraph.astext().strip() == "Bases:":
            paragraph.parent.remove(paragraph)


def builtins_stay_builtins(app: Sphinx, doctree: nodes.document) -> None:
    """Keep ``type`` in a signature's ``type[FlowEvent]`` from matching ``FlowEvent.type``.

    Names in signatures are looked up fuzzily: a builtin name that no page
    describes would match every attribute of that name. Look builtins up
    exactly instead; they then render as plain code.
    """
    for node in doctree.findall(addnodes.pending_xref):
        if node.get("refdomain") == "py" and hasattr(builtins, node.get("reftarget", "")):
            node.attributes.pop("refspecific", None)


def napoleon_sections(
    app: Sphinx, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    """Napoleon, reading attribute docstrings as trioflow writes them.

    Napoleon takes the first line of an attribute's docstring as
    ``type: description``, so ``"A run began. Data: ``task``"`` would show
    ``A run began. Data`` as a type. trioflow's attributes get their types
    from annotations, and their docstrings are prose (a property's may have
    a ``Raises:`` section): read them as a function's.
    """
    from sphinx.ext.napoleon import _process_docstring

    if what in {"attribute", "data", "property"}:
        what = "function"
    _process_docstring(app, what, name, obj, options, lines)


def setup(app: Sphinx) -> dict[str, Any]:
    from sphinx.ext.napoleon import _process_docstring

    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is _process_docstring:
            app.disconnect(listener.id)
    app.connect("autodoc-process-docstring", napoleon_sections)
    app.connect("autodoc-process-bases", drop_object_base)
    app.add_directive("trioflow-top-level-names", TopLevelNames)
    app.add_directive("trioflow-tool", ToolDescription)
    app.connect("doctree-read", builtins_stay_builtins)
    app.connect("doctree-read", drop_empty_bases)
    app.connect("missing-reference", resolve_elsewhere)
    return {"parallel_read_safe": True}
