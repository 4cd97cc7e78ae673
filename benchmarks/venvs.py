"""The torch-free virtualenvs that the slim benchmarks and tests serve from: ``pip install .``
(the slim server) at ``.venv-slim``, ``pip install '.[extra]'`` at ``.venv-<extra>``. Each is
made once and kept (git ignores them); this checkout is reinstalled into it every time, so it
serves the code under test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def torch_free_python(extra: str | None = None) -> Path:
    """The interpreter of the slim install, or of the slim install with ``extra``, made if missing."""
    venv = ROOT / (f".venv-{extra}" if extra else ".venv-slim")
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", f"{ROOT}[{extra}]" if extra else str(ROOT)]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(install, check=True, timeout=1200)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)],
                   check=True, timeout=600)
    if subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, timeout=120).returncode != 0:
        subprocess.run(install, check=True, timeout=1200)  # a dependency added since the venv was made
    return python
