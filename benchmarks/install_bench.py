"""What each install costs on disk: a fresh virtualenv per install, its size and its packages.

    python benchmarks/install_bench.py [--installs slim openvino torch] [--out install_bench]

Each install (``pip install .``, ``pip install '.[openvino]'``, ``pip install '.[torch]'``) goes
into a new virtualenv in a temporary folder, made with this interpreter's ``venv``; the table
gives the virtualenv's size on disk (every file, as ``du`` counts it: allocated blocks) and the
number of packages ``pip list`` shows (pip, setuptools and resnet-serve included), and the
largest packages. pip's settings (index, local wheel folders) apply as for any install. The
virtualenvs are deleted afterwards. Writes ``benchmarks/results/<out>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from http_bench import RESULTS  # noqa: E402
from machine import publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INSTALLS = {"slim": "", "openvino": "[openvino]", "heif": "[heif]", "torch": "[torch]"}
LARGEST = 3  # packages named per install


def folder_mb(folder: Path) -> float:
    """Allocated size of every file under ``folder`` (hard links once), in MB of 2**20 bytes."""
    seen: set[tuple[int, int]] = set()
    blocks = 0
    for path in folder.rglob("*"):
        stat = path.lstat()
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            blocks += stat.st_blocks
    return round(blocks * 512 / 2**20, 1)


def packages(python: Path) -> list[str]:
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True,
                            text=True, check=True, timeout=120).stdout
    return sorted(row["name"] for row in json.loads(listed))


def largest(site_packages: Path) -> dict[str, float]:
    """The biggest top-level folders of site-packages (a package and its libraries)."""
    sizes = {p.name: folder_mb(p) for p in site_packages.iterdir() if p.is_dir() and not p.name.endswith("-info")}
    return dict(sorted(sizes.items(), key=lambda item: -item[1])[:LARGEST])


def measure(install: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"install-{install}-") as scratch:
        venv = Path(scratch) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        python = venv / "bin" / "python"
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"{ROOT}{INSTALLS[install]}"],
                       check=True, timeout=3600)
        (site_packages,) = (venv / "lib").glob("python*/site-packages")
        names = packages(python)
        return {"mb": folder_mb(venv), "packages": len(names), "names": names, "largest_mb": largest(site_packages)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--installs", nargs="+", choices=list(INSTALLS), default=list(INSTALLS))
    parser.add_argument("--out", default="install_bench", help="file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    report: dict[str, object] = {name: measure(name) for name in args.installs}
    lines = ["| install | virtualenv MB | packages | largest (MB) |", "|---|---:|---:|---|"]
    for name, row in report.items():
        biggest = ", ".join(f"{package} {mb}" for package, mb in row["largest_mb"].items())  # type: ignore[index]
        lines.append(f"| `pip install '.{INSTALLS[name]}'` | {row['mb']} | {row['packages']} | {biggest} |")  # type: ignore[index]
    publish(RESULTS / args.out, lines, f"fresh virtualenvs, Python {sys.version.split()[0]}", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
