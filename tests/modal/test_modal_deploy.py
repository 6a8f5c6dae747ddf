"""What `modal deploy` / `modal run` would ship and run, checked offline with Modal's own
code: the CLI's import, the source mount's file list, the prefetch function, the secrets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from cluster.render import MODEL_CACHE_MOUNT
from modal_adapter import plan as planning
from tests.conftest import REPO, load_modal_app

PROD = REPO / "cluster" / "serve-prod.yaml"


@pytest.fixture(scope="module")
def prod_app():
    return load_modal_app(PROD, "prod", "modal_app_deploy_prod")


def uploaded(image) -> dict[str, str]:
    """Remote path -> local path of every file the image's source mounts upload, listed by
    Modal's own mount code (the ignore patterns applied as at deploy)."""
    from modal._utils.async_utils import synchronizer
    from modal.mount import _Mount

    # The local-files layers are the image's _Mount dependencies (attached at container
    # start, see modal's _Image._add_mount_layer_or_copy).
    mounts = [d for d in synchronizer._translate_in(image)._deps() if isinstance(d, _Mount)]
    assert mounts, "the image has no local source mount"
    files = {}
    for mount in mounts:
        for entry in mount.entries:
            for local, remote in entry.get_files_to_upload():
                files[str(remote)] = str(local)
    return files


def test_the_source_mount_ships_the_package_data_the_code_reads(prod_app):
    files = uploaded(prod_app.image)
    assert "/root/serve_apps/engines/smoke_corpus.txt" in files
    assert "/root/modal_adapter/runtime.py" in files and "/root/serve_apps/ingress.py" in files
    # Every file git tracks in the shipped packages is uploaded (nothing the code reads is
    # left behind), and nothing else is (no bytecode, no caches).
    tracked = subprocess.run(
        [
            "git",
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "serve_apps",
            "modal_adapter",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {f"/root/{p}" for p in tracked} == set(files)


def test_the_hf_token_secret_is_optional_and_goes_to_the_prefetch_only(prod_app, tmp_path):
    assert prod_app.PLAN.secrets == []
    assert prod_app.prefetch.info().secrets == []
    # No class gets the token (the ingress gets the API keys' secret only: auth is on).
    for plan in prod_app.PLAN.classes:
        info = getattr(prod_app, plan.name)._get_class_service_function().info()
        assert not any("hf-token" in s for s in info.secrets), plan.name
    with_token = load_modal_app(
        PROD, "prod", "modal_app_with_token", env={"SERVE_APPS_MODAL_HF_SECRET": "hf-token"}
    )
    assert with_token.PLAN.secrets == ["hf-token"]
    (secret,) = with_token.prefetch.info().secrets
    assert "hf-token" in secret
    for plan in with_token.PLAN.classes:
        info = getattr(with_token, plan.name)._get_class_service_function().info()
        assert not any("hf-token" in s for s in info.secrets), plan.name


def test_prefetch_and_smoke_test_are_what_modal_run_finds(prod_app):
    from modal.cli.import_refs import import_and_filter, parse_import_ref

    for name in ("prefetch", "smoke_test"):
        ref = parse_import_ref(f"{REPO}/modal_adapter/app.py::{name}")
        runnable, _, _ = import_and_filter(ref, base_cmd="modal run")
        assert runnable is not None, name
    info = prod_app.prefetch.info()
    assert set(info.volumes) == {MODEL_CACHE_MOUNT}
    assert info.volumes[MODEL_CACHE_MOUNT].name == "serve-apps-model-cache"
    assert info.timeout == planning.PREFETCH_TIMEOUT_S
    # The model classes load what the prefetch left, from the same volume, offline.
    env = prod_app.PLAN.env
    assert env["SERVE_APPS_OFFLINE_MODELS"] == "1"
    assert "modal run modal_adapter/app.py::prefetch" in env["SERVE_APPS_PREFETCH_COMMAND"]
    assert env["VLLM_CACHE_ROOT"].startswith(MODEL_CACHE_MOUNT)
    assert env["HF_HOME"].startswith(MODEL_CACHE_MOUNT)


def _index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


# Run inside the fresh venv: what `modal deploy` and `modal run` import, through Modal's
# own CLI import code (nothing contacts Modal's servers).
FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from modal.cli.import_refs import import_and_filter, import_app, parse_import_ref
    app = import_app("modal_adapter/app.py")
    found = [
        import_and_filter(parse_import_ref(f"modal_adapter/app.py::{n}"), base_cmd="modal run")[0]
        is not None
        for n in ("prefetch", "smoke_test")
    ]
    print(json.dumps({"app": app.name, "classes": sorted(app.registered_classes),
                      "runnable": found, "ray": "ray" in sys.modules}))
    """
)


@pytest.mark.fresh_venv
def test_the_documented_modal_install_imports_and_builds_the_app_in_a_fresh_venv(tmp_path):
    if not _index_reachable():
        pytest.skip("pip has no network here: cannot install into a fresh venv")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    # The README's install, under the project's pins, from pip's cache where it can.
    install = subprocess.run(
        [
            *(python, "-m", "pip", "install", "--quiet"),
            *("-c", "requirements/constraints.txt", "-e", ".[modal]"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    out = subprocess.run(
        [python, "-c", FRESH_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["app"] == "serve-apps"
    # The classes the default plan makes (Detector and SAM may share one: packing).
    from modal_adapter.plan import plan_from_settings

    expected = {c.name for c in plan_from_settings().classes}
    assert "Ingress" in expected and "LLM" in expected
    assert set(result["classes"]) == expected
    assert result["runnable"] == [True, True]
    # Nothing the containers would lack: the import itself needs no model library.
    freeze = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], env=env, capture_output=True, text=True
    )
    names = {p["name"].lower() for p in json.loads(freeze.stdout)}
    assert "modal" in names and "ray" in names and "torch" not in names
