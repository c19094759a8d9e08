"""The separate virtual environment holding dalle2-pytorch for the side-by-side benchmark.

dalle2-pytorch is never a dependency of the project: it lives in ``bench/.venv-dalle2``
(gitignored), created on first use with exactly

    python3 -m venv bench/.venv-dalle2
    bench/.venv-dalle2/bin/pip install torch==2.14.1 torchvision==0.29.1 dalle2-pytorch==1.15.6

(the same torch as the project, so both sides run the same kernels). ``python -m bench.dalle2_env``
creates it and prints its interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ENV = Path(__file__).resolve().parent / ".venv-dalle2"
THEIRS = Path(__file__).resolve().parent / "their_dalle2.py"  # runs in ENV, without our package
PACKAGES = ("torch==2.14.1", "torchvision==0.29.1", "dalle2-pytorch==1.15.6")


def python_path(env: Path = ENV) -> Path:
    return env / "bin" / "python"


def ensure_env(env: Path = ENV) -> Path:
    """The environment's interpreter; creates the environment when it is missing or broken."""
    py = python_path(env)
    if py.exists() and subprocess.run([str(py), "-c", "import dalle2_pytorch"],
                                      capture_output=True).returncode == 0:
        return py
    print(f"creating {env} with {' '.join(PACKAGES)} (once; a few minutes)", file=sys.stderr)
    subprocess.run(["python3", "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin" / "pip"), "install", *PACKAGES], check=True)
    check = subprocess.run([str(py), "-c", "import dalle2_pytorch"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"{env}: dalle2_pytorch does not import after installing:\n{check.stderr}")
    return py


def run_theirs(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``their_dalle2.py`` on ``spec`` in the environment (created when missing); the JSON it
    prints last."""
    python = ensure_env()
    proc = subprocess.run([str(python), str(THEIRS), json.dumps(spec)], capture_output=True,
                          text=True, cwd=str(THEIRS.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"their_dalle2.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"their_dalle2.py printed no JSON:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(ensure_env())
