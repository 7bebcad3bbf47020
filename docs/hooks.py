"""Build hooks for the documentation site (``mkdocs.yml`` names this file under ``hooks``).

* The API reference must cover every module: a module under ``online_llc/`` or ``callbacks/``
  (``online_llc.callbacks``) that no ``::: module`` line of ``docs/reference/`` names fails the
  build (``mkdocs build --strict``); empty ``__init__.py`` files are exempt.
* The docstrings cross-reference in reStructuredText roles (``:class:`OnlineLLC```), which
  Markdown leaves as text: a role becomes a link to the object where the reference renders it,
  and plain code otherwise.
* The images of a live run are produced by the build: the Hugging Face Trainer demo
  (:mod:`online_llc.demos.trainer_gpt2`, a tiny GPT-2, seeded) runs once per build process and
  its two PNGs become the site's ``images/tensorboard_margin.png`` (the Margin charts of the
  custom-scalars layout in its TensorBoard event file) and ``images/trainer_gpt2.png``
  (``online-llc plot`` on its ``output_dir``). They are never committed, so they always show what
  the current code logs. The demo needs the ``hf`` extra, which the ``docs`` extra installs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import tempfile
import time
from typing import Any, Dict, Optional

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


#: The Trainer demo's length for the docs' images (training steps): long enough for every head
#: to leave its warm-up, short enough for a build (about a minute on 2 cores).
DEMO_STEPS = 300
#: The images the demo leaves, by their path on the site.
IMAGES = {"images/tensorboard_margin.png": "tensorboard_margin.png", "images/trainer_gpt2.png": "trainer_gpt2.png"}
_images: Dict[str, bytes] = {}  # one run per process: `mkdocs serve` rebuilds without rerunning


def _run_images() -> Dict[str, bytes]:
    if not _images:
        from online_llc.demos import trainer_gpt2

        start = time.perf_counter()
        log.info("online_llc: running the Trainer demo (%d steps) for the docs' images", DEMO_STEPS)
        with tempfile.TemporaryDirectory() as out:
            with contextlib.redirect_stdout(io.StringIO()) as said:
                rc = trainer_gpt2.main(["--out", out, "--steps", str(DEMO_STEPS), "--quiet"])
            if rc:
                raise RuntimeError(f"the Trainer demo exited with status {rc}: {said.getvalue()[-500:]}")
            for site, name in IMAGES.items():
                with open(os.path.join(out, name), "rb") as fh:
                    _images[site] = fh.read()
        log.info("online_llc: the docs' images took %.0f s", time.perf_counter() - start)
    return _images


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    from mkdocs.structure.files import File

    try:
        images = _run_images()
    except ImportError as exc:  # a docs build without the hf extra
        log.warning("the docs' images need the hf extra (%s): pip install -e '.[docs]'", exc)
        return files
    for site, data in images.items():
        files.append(File.generated(config, site, content=data))
    return files


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
