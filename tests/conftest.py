"""Shared test fixtures: a tiny synthetic dataset and the real polyp and task data (when present).

Also puts the repository root on ``sys.path`` so the tests run from any working directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from shared_model.data.synthetic import generate_dataset  # noqa: E402

SYNTHETIC_CENTRES = ("centre_0", "centre_1", "centre_2")
SYNTHETIC_PER_CENTRE = 8
SYNTHETIC_SIZE = 64


@pytest.fixture(scope="session", autouse=True)
def _data_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Deployed hospitals cache their data check under $PROMPTSAM_CACHE: a temporary folder in tests
    (inherited by the SuperNodes and ClientApp processes the deployment tests start)."""
    previous = os.environ.get("PROMPTSAM_CACHE")
    os.environ["PROMPTSAM_CACHE"] = str(tmp_path_factory.mktemp("promptsam_cache"))
    yield
    if previous is None:
        os.environ.pop("PROMPTSAM_CACHE", None)
    else:
        os.environ["PROMPTSAM_CACHE"] = previous


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (federation tests are many small ops; 2 cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _synthetic_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic_master"), list(SYNTHETIC_CENTRES),
                            per_centre=SYNTHETIC_PER_CENTRE, image_size=SYNTHETIC_SIZE, seed=0)


@pytest.fixture
def synthetic_root(_synthetic_master: Path, tmp_path: Path) -> Path:
    """A fresh, writable copy of a synthetic dataset: 3 centres x 8 pairs of 64 x 64 PNGs.

    Layout ``<root>/centre_{0,1,2}/{images,masks}/centre_<i>_<nnnn>.png`` (masks 0/255).
    """
    root = tmp_path / "synthetic"
    shutil.copytree(_synthetic_master, root)
    return root


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def polyp_root() -> Path:
    """The real data root: env ``PROMPTSAM_DATA``, else ``<repo>/../shared/data/polyp``.

    Skips when the folder is missing, except under CI (env ``CI=true``), where it fails.
    """
    env = os.environ.get("PROMPTSAM_DATA")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "polyp"
    if not root.is_dir():
        message = (f"real polyp data not found at {root} (set PROMPTSAM_DATA to the folder holding "
                   "kvasir_seg/, cvc_clinicdb/, cvc_colondb/)")
        if _ci():
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def tasks_root() -> Path:
    """The real non-polyp tasks (busi, retina_vessels): env ``PROMPTSAM_TASKS``, else
    ``<repo>/../shared/data/tasks``. Skips when the folder is missing, except under CI, where it fails."""
    env = os.environ.get("PROMPTSAM_TASKS")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "tasks"
    if not root.is_dir():
        message = (f"real task data not found at {root} (set PROMPTSAM_TASKS to the folder holding "
                   "busi/ and retina_vessels/)")
        if _ci():
            pytest.fail(message)
        pytest.skip(message)
    return root
