"""Model provisioning offline: a local HTTP server stands in for the SAM checkpoint's
host, a Hub cache laid out as huggingface_hub writes it stands in for a download."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from serve_apps import provision
from serve_apps.config import ModelConfig, SAMConfig, Settings
from serve_apps.provision import Checkpoint, HubModel, ModelNotProvisionedError, ProvisionError
from tests.conftest import REPO

PROD = REPO / "cluster" / "serve-prod.yaml"
COMMAND = "modal run modal_adapter/app.py::prefetch"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", offline_models=True, prefetch_command=COMMAND)


# --------------------------------------------------------------------------- what to fetch
def test_the_production_config_names_its_hub_models_and_the_official_sam_checkpoint():
    items = provision.assets(provision.args_from_serve_config(PROD))
    hub = {a.repo_id: a.revision for a in items if isinstance(a, HubModel)}
    assert set(hub) == {
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen2.5-Coder-32B-Instruct",
        "IDEA-Research/Rex-Omni",
    }
    assert hub["Qwen/Qwen2.5-7B-Instruct"] and hub["Qwen/Qwen2.5-Coder-32B-Instruct"]
    (sam,) = [a for a in items if isinstance(a, Checkpoint)]
    assert sam.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert sam.path == "/mnt/model-cache/sam/sam_vit_h_4b8939.pth"
    assert provision.SHA256_HEX.match(sam.sha256)


def test_smoke_models_and_local_paths_need_no_prefetch(tmp_path):
    assert provision.model_assets(ModelConfig(served_model_name="x")) == []
    assert provision.model_assets(ModelConfig(served_model_name="x", model=str(tmp_path))) == []
    assert provision.model_assets(SAMConfig()) == []
    assert provision.is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert not provision.is_hub_id("./models/qwen")


# --------------------------------------------------------------------------- checkpoints
class _Files(http.server.BaseHTTPRequestHandler):
    """Serves BODY with range requests; the first answer stops after CUT bytes."""

    BODY = b""
    CUT: int | None = None
    ranges: list[str | None] = []

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        body = self.BODY[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, type(self).CUT = type(self).CUT, None
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.close()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Files.BODY = bytes(range(256)) * 40_000  # ~10 MB
    _Files.ranges = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/sam_vit_h_4b8939.pth"
    httpd.shutdown()


def test_an_interrupted_checkpoint_download_resumes_and_is_checked(server, settings, tmp_path):
    target = tmp_path / "volume" / "sam" / "sam_vit_h_4b8939.pth"
    ckpt = Checkpoint(server, hashlib.sha256(_Files.BODY).hexdigest(), str(target))
    _Files.CUT = 3_000_000
    with pytest.raises(Exception):  # noqa: B017 - the connection drops mid-body
        provision.fetch_checkpoint(ckpt, settings)
    part = target.with_name(target.name + ".part")
    assert part.stat().st_size == 3_000_000 and not target.exists()
    with pytest.raises(ModelNotProvisionedError, match=COMMAND):
        provision.checkpoint(ckpt, settings)

    assert provision.fetch_checkpoint(ckpt, settings) == target
    assert _Files.ranges == [None, "bytes=3000000-"]
    assert target.read_bytes() == _Files.BODY and not part.exists()
    assert provision.check([ckpt], settings) == [target]


def test_a_checkpoint_that_does_not_match_its_pinned_sha256_is_refused(server, settings, tmp_path):
    target = tmp_path / "sam.pth"
    ckpt = Checkpoint(server, "0" * 64, str(target))
    with pytest.raises(ProvisionError, match="is not the pinned"):
        provision.fetch_checkpoint(ckpt, settings)
    assert not target.exists() and not target.with_name("sam.pth.part").exists()


def test_a_truncated_checkpoint_on_the_cache_is_a_startup_error(server, settings, tmp_path):
    target = tmp_path / "sam.pth"
    ckpt = Checkpoint(server, hashlib.sha256(_Files.BODY).hexdigest(), str(target))
    provision.fetch_checkpoint(ckpt, settings)
    with target.open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelNotProvisionedError, match=f"damaged.*{COMMAND}"):
        provision.checkpoint(ckpt, settings)


async def test_the_sam_replica_refuses_to_start_without_its_prefetched_checkpoint(
    settings, tmp_path
):
    from serve_apps.replicas.vision import SegmenterServer

    cfg = SAMConfig(model_type="vit_b", checkpoint=str(tmp_path / "sam_vit_b_01ec64.pth"))
    with pytest.raises(ModelNotProvisionedError, match=f"sam_vit_b_01ec64.pth.*{COMMAND}"):
        await SegmenterServer(cfg, settings=settings).start()


# --------------------------------------------------------------------------- Hub snapshots
COMMIT = "a09a35458c702b33eeacc393d103063234e8bc28"


def fake_hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A snapshot as huggingface_hub lays it out: blobs named by hash, symlinked."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        lfs = name.endswith(".safetensors")
        blob_name = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / blob_name).write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob_name)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing here may reach the Hub
    return cache


FILES = {"config.json": b'{"model_type": "qwen2"}', "model.safetensors": b"\x01" * 4096}


def test_a_prefetched_snapshot_is_verified_and_found_offline(hub_cache, settings):
    snapshot = fake_hub_cache(hub_cache, "Qwen/Qwen2.5-7B-Instruct", FILES)
    model = HubModel("Qwen/Qwen2.5-7B-Instruct", COMMIT)
    with pytest.raises(ModelNotProvisionedError, match=f"not on the model cache.*{COMMAND}"):
        provision.hub_snapshot(model, settings)  # on disk, but never verified by a prefetch
    assert provision.prefetch([model], settings) == [snapshot]
    assert provision.hub_snapshot(model, settings) == snapshot


def test_a_corrupt_blob_is_dropped_by_the_prefetch_and_a_missing_one_fails_startup(
    hub_cache, settings
):
    snapshot = fake_hub_cache(hub_cache, "Qwen/Qwen2.5-7B-Instruct", FILES)
    model = HubModel("Qwen/Qwen2.5-7B-Instruct", COMMIT)
    provision.prefetch([model], settings)
    weights = snapshot / "model.safetensors"
    weights.resolve().write_bytes(b"\x02" * 4096)  # same size, other bytes
    # Offline, the prefetch cannot fetch the dropped file again: it says so.
    with pytest.raises(ProvisionError, match=r"model\.safetensors could not be downloaded"):
        provision.prefetch([model], settings)
    assert not weights.exists()
    with pytest.raises(ModelNotProvisionedError, match=f"damaged.*missing.*{COMMAND}"):
        provision.hub_snapshot(model, settings)


async def test_an_llm_replica_loads_the_snapshot_directory_or_names_the_prefetch(
    hub_cache, settings
):
    from serve_apps.engines import resolve_model
    from serve_apps.replicas.llm import LLMServer

    cfg = ModelConfig(served_model_name="q", model="Qwen/Qwen2.5-7B-Instruct", revision=COMMIT)
    with pytest.raises(ModelNotProvisionedError, match=COMMAND):
        await LLMServer(cfg, settings=settings).start()
    snapshot = fake_hub_cache(hub_cache, "Qwen/Qwen2.5-7B-Instruct", FILES)
    provision.prefetch(provision.model_assets(cfg), settings)
    assert resolve_model(cfg, settings) == str(snapshot)
    online = settings.model_copy(update={"offline_models": False})
    assert resolve_model(cfg, online) == "Qwen/Qwen2.5-7B-Instruct"
