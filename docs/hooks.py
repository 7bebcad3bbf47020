"""Build hooks for the documentation site (``mkdocs.yml`` names this file under ``hooks``).

* The API reference must cover every module: a module under ``online_llc/`` or ``callbacks/``
  (``online_llc.callbacks``) that no ``::: module`` line of ``docs/reference/`` names fails the
  build (``mkdocs build --strict``); empty ``__init__.py`` files are exempt.
* The docstrings cross-reference in reStructuredText roles (``:class:`OnlineLLC```), which
  Markdown leaves as text: a role becomes a link to the object where the reference renders it,
  and plain code otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Any, Optional

log = logging.getLogger("mkdocs.hooks.online_llc")

SOURCES = (("online_llc", "online_llc"), ("callbacks", "online_llc.callbacks"))
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)", re.MULTILINE)
ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):<code>(~?)([\w.]+)(\(\))?</code>")


def _modules(root: str) -> set:
    """Every module of the package under the repository ``root``, by its import path."""
    found = set()
    for folder, package in SOURCES:
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            for name in filenames:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                if name == "__init__.py" and not open(path, encoding="utf-8").read().strip():
                    continue
                rel = os.path.relpath(path, base)[: -len(".py")].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found.add(".".join([package, *rel]))
    return found


def on_pre_build(config: Any, **kwargs: Any) -> None:
    reference = os.path.join(config["docs_dir"], "reference")
    named = set()
    for name in os.listdir(reference):
        if name.endswith(".md"):
            with open(os.path.join(reference, name), encoding="utf-8") as fh:
                named.update(DIRECTIVE.findall(fh.read()))
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    for module in sorted(_modules(root) - named):
        log.warning("the API reference misses %s: add '::: %s' to a page under docs/reference/", module, module)


def _canonical(identifier: str) -> Optional[str]:
    """The path the reference renders an object at, for a name the package exports."""
    if not identifier.startswith("online_llc"):
        identifier = f"online_llc.{identifier}"
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        if isinstance(obj, type(importlib)):
            return obj.__name__
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if module and qualname and not isinstance(obj, (tuple, list, dict, str, int, float)):
            return f"{module}.{qualname}"
        return identifier
    return None


def _link(match: "re.Match[str]") -> str:
    short, name, call = match.group(1), match.group(2), match.group(3) or ""
    shown = name.rsplit(".", 1)[-1] if short else name
    target = _canonical(name)
    code = f"<code>{shown}{call}</code>"
    if target is None:
        return code
    return f'<autoref identifier="{target}" optional>{code}</autoref>'


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(_link, html)
