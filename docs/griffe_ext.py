"""Griffe extensions for the API reference (``mkdocs.yml``: the python handler's ``extensions``).

* :class:`InstalledCallbacks` reads the ``callbacks/`` folder as ``online_llc.callbacks``, as the
  package installs it (``pyproject.toml``: ``package-dir``). Static analysis finds
  ``online_llc/`` on disk but not the folder installed into it; this visits ``callbacks/*.py``
  when ``online_llc`` itself is visited and attaches them below it.
* :class:`HomeOnly` documents each object once, at its home: a name a module re-exports in its
  ``__all__`` (``online_llc.monitor.estimator`` exports the records, say) is left out of that
  module's page, which would otherwise repeat the object's whole documentation.
* :class:`CommentDocstrings` reads a ``#:`` comment above a module or class attribute (the
  package documents its constants that way) as the attribute's docstring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe

__all__ = ["CommentDocstrings", "HomeOnly", "InstalledCallbacks"]


def _visit(name: str, path: Path, parent: griffe.Module, agent: Any) -> griffe.Module:
    code = path.read_text(encoding="utf-8-sig")
    agent.lines_collection[path] = code.splitlines(keepends=False)
    module = griffe.visit(
        name,
        filepath=path,
        code=code,
        parent=parent,
        extensions=agent.extensions,
        docstring_parser=agent.docstring_parser,
        docstring_options=agent.docstring_options,
        lines_collection=agent.lines_collection,
        modules_collection=agent.modules_collection,
    )
    parent.set_member(name, module)
    return module


class InstalledCallbacks(griffe.Extension):
    """Attach ``callbacks/`` below ``online_llc`` as ``online_llc.callbacks``."""

    def on_module_members(self, *, mod: griffe.Module, agent: Any, **kwargs: Any) -> None:
        if mod.path != "online_llc" or "callbacks" in mod.members or mod.filepath is None:
            return
        folder = Path(mod.filepath).parent.parent / "callbacks"
        if not (folder / "__init__.py").is_file():
            return
        package = _visit("callbacks", folder / "__init__.py", mod, agent)
        for path in sorted(folder.glob("*.py")):
            if path.name != "__init__.py":
                _visit(path.stem, path, package, agent)


class CommentDocstrings(griffe.Extension):
    """An attribute without a docstring takes the ``#:`` comment lines right above it."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, agent: Any, **kwargs: Any) -> None:
        if attr.docstring is not None or not attr.lineno or not hasattr(agent, "code"):
            return
        lines = agent.code.splitlines()
        i, found = attr.lineno - 2, []
        while i >= 0 and lines[i].strip().startswith("#:"):
            found.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        if found:
            attr.docstring = griffe.Docstring(
                "\n".join(found),
                lineno=i + 2,
                endlineno=attr.lineno - 1,
                parent=attr,
                parser=agent.docstring_parser,
                parser_options=agent.docstring_options,
            )


class HomeOnly(griffe.Extension):
    """Drop re-exported names (aliases) from every module's ``__all__`` as the reference sees it."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._prune(pkg)

    def _prune(self, module: griffe.Module) -> None:
        if module.exports is not None:
            members = module.members
            module.exports = [n for n in module.exports if not (str(n) in members and members[str(n)].is_alias)]
        for member in module.members.values():
            if not member.is_alias and member.is_module:
                self._prune(member)
