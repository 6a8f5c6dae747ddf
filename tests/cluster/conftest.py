"""Fixtures for the cluster tests: the real KubeRay CRDs and kubectl, found loudly.

The CRDs are read at test time from ``../shared/reference/kuberay-crds`` (beside the
repository in CI; KUBERAY_CRDS_DIR overrides it); nothing is copied into the repo. A
missing directory or kubectl fails the tests that need them, with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO

SHARED_CRDS = REPO.parent / "shared" / "reference" / "kuberay-crds"


@pytest.fixture(scope="session")
def kuberay_crds() -> Path:
    crds = Path(os.environ.get("KUBERAY_CRDS_DIR", SHARED_CRDS))
    if not (crds / "ray.io_rayservices.yaml").is_file():
        pytest.fail(
            f"KubeRay v1.7.0 CRDs not found in {crds}: the manifest tests validate every "
            "RayService against ray.io_rayservices.yaml from ../shared/reference/kuberay-crds "
            "(beside the repository in CI). Set KUBERAY_CRDS_DIR to a copy of that directory.",
            pytrace=False,
        )
    return crds


@pytest.fixture(scope="session")
def rayservice_schema(kuberay_crds: Path) -> dict:
    from cluster.crd import load_crd_schema

    return load_crd_schema(kuberay_crds / "ray.io_rayservices.yaml")


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl not found on PATH: the overlay tests build k8s/overlays/* with "
            "`kubectl kustomize` (kubectl v1.32 / kustomize v5.5 on the dev machines). "
            "Install kubectl to run them.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def prod_config() -> dict:
    from cluster.render import PROD_CONFIG, load_config

    return load_config(PROD_CONFIG)
