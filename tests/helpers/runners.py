"""The runner scripts (``run_pretrain.py``, ``run_squad.py``, ``run_glue.py``) as modules, for in-process tests."""

from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_runner(name: str):
    """``REPO/<name>.py`` imported as a fresh module (its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
