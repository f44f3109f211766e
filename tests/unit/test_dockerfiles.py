"""The container images (docker/*.Dockerfile; not built in CI: no Docker engine runs there):
pinned bases, a non-root user, a health check, and a router image without torch."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"worker": ROOT / "docker" / "worker.Dockerfile",
               "router": ROOT / "docker" / "router.Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_bases_are_pinned(name):
    bases = [args.split()[0] for word, args in instructions(DOCKERFILES[name]) if word == "FROM"]
    assert bases
    for base in bases:
        if "@sha256:" in base:
            continue
        image, _, tag = base.rpartition(":")
        assert image and "/" not in tag, f"{base}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"{base}: not exact"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_non_root_user_with_a_health_check(name):
    steps = instructions(DOCKERFILES[name])
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [word for word, _ in steps].index("USER") > max(
        i for i, (word, _) in enumerate(steps) if word == "RUN")  # nothing runs as root after
    health = [args for word, args in steps if word == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0]
    if name == "router":
        assert "/health" in health[0]


def test_router_image_installs_no_torch():
    runs = " ".join(args for word, args in instructions(DOCKERFILES["router"]) if word == "RUN")
    assert "torch" not in runs.replace("'torch' not in sys.modules", "")
    assert not re.search(r"\.\[(worker|dev)", runs)
    # And the base dependencies it installs do not bring torch in.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("torch")]
    assert any(d.startswith("torch==2.13.0") for d in project["optional-dependencies"]["worker"])


def test_worker_image_gets_cuda_torch_the_worker_extra_and_ray():
    steps = instructions(DOCKERFILES["worker"])
    bases = [args for word, args in steps if word == "FROM"]
    assert any(b.startswith("nvidia/cuda:") for b in bases)
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "torch==2.13.0" in runs and "download.pytorch.org/whl/cu" in \
        " ".join(args for _, args in steps)
    assert '".[worker]"' in runs
    # The GPU attention kernel is Triton's (CUDA torch's dependency), which compiles its
    # launcher with the image's C compiler: the build imports it, and gcc is there.
    assert "import torch, triton" in runs and " gcc " in runs
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("ray[default]==") for d in project["dependencies"])
