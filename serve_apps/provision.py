"""Model provisioning: every model a config names, onto the model cache, once, before traffic.

    python -m serve_apps.provision --config cluster/serve-prod.yaml          # download
    python -m serve_apps.provision --config cluster/serve-prod.yaml --check  # verify only

What a config names (:func:`assets`):

- a Hub model (``model:`` of an LLM-style service, not a local path): a snapshot at the
  config's pinned ``revision`` with ``huggingface_hub.snapshot_download`` into ``HF_HOME``
  (resumable, progress bars); every LFS file is then checked against its SHA-256 (the
  blob's name in the Hub cache);
- the SAM checkpoint (``sam.checkpoint`` of model type ``vit_h``/``vit_l``/``vit_b``):
  from its official URL (:data:`SAM_CHECKPOINTS`), resumed with an HTTP range request
  after an interruption, checked against the pinned SHA-256, moved into place when whole.

After an asset is verified a manifest (every file and its size) is written under
``<SERVE_APPS_CACHE_DIR>/provisioned``. Replicas that run with
``SERVE_APPS_OFFLINE_MODELS=1`` (the Modal classes, the KubeRay workers) load only what a
manifest vouches for (:func:`hub_snapshot`, :func:`checkpoint`): a missing or damaged
model is a :class:`ModelNotProvisionedError` at start that names the prefetch command
(``SERVE_APPS_PREFETCH_COMMAND``), never a download on a paid GPU.

Imports ``huggingface_hub`` lazily (the ``llm`` extra); the SAM download needs only httpx.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ModelConfig, SAMConfig, Settings

if TYPE_CHECKING:
    from .registry import AppArgsBase

logger = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 8 * 2**20


@dataclass(frozen=True)
class Checkpoint:
    """A file from a fixed URL, checked against a pinned SHA-256."""

    url: str
    sha256: str
    path: str  # where the config reads it

    @property
    def key(self) -> str:
        return f"file/{Path(self.path).name}"

    def describe(self) -> str:
        return f"{self.url} -> {self.path}"


# segment-anything's official checkpoints (the URLs of its README's "Model Checkpoints").
# The README gives no checksums: these SHA-256s are the files' as recorded independently
# by several public projects that verify the same downloads (vit_h: 2,564,550,879 bytes).
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "vit_h": (
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "vit_l": (
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_b": (
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
}


@dataclass(frozen=True)
class HubModel:
    """A Hugging Face Hub snapshot at a revision (a commit hash when pinned)."""

    repo_id: str
    revision: str | None

    @property
    def key(self) -> str:
        return f"hub/{self.repo_id.replace('/', '--')}@{self.revision or 'main'}"

    def describe(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main (not pinned)'}"


Asset = HubModel | Checkpoint


class ProvisionError(RuntimeError):
    """A download or a check failed (the message says which file and why)."""


class ModelNotProvisionedError(RuntimeError):
    """A replica's model is not (or not wholly) on the model cache."""


def is_hub_id(model: str) -> bool:
    """``org/name`` that is not a directory here: a Hub id, not a local path."""
    return (
        not model.startswith(("/", ".", "~")) and model.count("/") == 1 and not Path(model).exists()
    )


def model_assets(cfg: object) -> list[Asset]:
    """What one service's config loads from outside the image."""
    if isinstance(cfg, ModelConfig):
        found: list[Asset] = (
            [HubModel(cfg.model, cfg.revision)] if cfg.model and is_hub_id(cfg.model) else []
        )
        # LoRA adapters on the Hub are snapshots too (replicas load them offline).
        found += [
            HubModel(a.path, a.revision) for a in cfg.adapters if a.path and is_hub_id(a.path)
        ]
        return found
    if isinstance(cfg, SAMConfig) and cfg.checkpoint is not None:
        if cfg.model_type not in SAM_CHECKPOINTS:
            return []
        name, sha = SAM_CHECKPOINTS[cfg.model_type]
        return [Checkpoint(SAM_URL + name, sha, cfg.checkpoint)]
    return []


def assets(args: AppArgsBase) -> list[Asset]:
    """Every model ``args`` names, each once."""
    found: dict[str, Asset] = {}
    for _, cfg in args.enabled():
        for asset in model_assets(cfg):
            found.setdefault(asset.key, asset)
    return list(found.values())


# --------------------------------------------------------------------------- manifests
def manifest_path(asset: Asset, settings: Settings) -> Path:
    return settings.cache_dir / "provisioned" / f"{asset.key}.json"


def _files_of(root: Path) -> dict[str, int]:
    if root.is_file():
        return {root.name: root.stat().st_size}
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def _write_manifest(asset: Asset, settings: Settings, root: Path, extra: dict[str, Any]) -> None:
    path = manifest_path(asset, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"asset": asset.describe(), "root": str(root), **extra, "files": _files_of(root)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    tmp.replace(path)


def _check_manifest(asset: Asset, settings: Settings, root: Path) -> dict[str, Any]:
    """The manifest, after checking every file it lists is there with its size."""
    hint = f"run `{settings.prefetch_command}`"
    path = manifest_path(asset, settings)
    if not path.is_file():
        raise ModelNotProvisionedError(
            f"{asset.describe()} is not on the model cache ({path} is missing): {hint}"
        )
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    base = root if root.is_dir() else root.parent
    damaged = []
    for rel, size in files.items():
        file = base / rel
        if not file.is_file():
            damaged.append(f"{rel} is missing")
        elif file.stat().st_size != size:
            damaged.append(f"{rel} has {file.stat().st_size} bytes, not {size}")
    if damaged:
        raise ModelNotProvisionedError(
            f"{asset.describe()} on the model cache is damaged ({'; '.join(damaged[:5])}): "
            f"{hint} (it downloads what is missing again)"
        )
    return manifest


# --------------------------------------------------------------------------- Hub snapshots
def _hub_snapshot_dir(model: HubModel, *, local_only: bool, token: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model.repo_id, revision=model.revision, local_files_only=local_only, token=token
        )
    )


def _damaged_blobs(snapshot: Path) -> list[Path]:
    """Snapshot files whose blob (named by its SHA-256 for LFS files) does not hash to it."""
    bad = []
    for file in sorted(snapshot.rglob("*")):
        if not file.is_file():
            continue
        blob = file.resolve()
        if SHA256_HEX.match(blob.name) and _sha256(blob) != blob.name:
            bad.append(file)
    return bad


def fetch_hub(model: HubModel, settings: Settings, token: str | None = None) -> Path:
    """Download (or resume) the snapshot, verify it, write its manifest; its directory."""
    snapshot = _hub_snapshot_dir(model, local_only=False, token=token)
    bad = _damaged_blobs(snapshot)
    if bad:  # drop what is damaged and fetch it once more
        for file in bad:
            logger.warning("%s: checksum mismatch, downloading it again", file)
            file.resolve().unlink()
            file.unlink()
        snapshot = _hub_snapshot_dir(model, local_only=False, token=token)
        missing = [f for f in bad if not f.is_file()]
        if missing:
            raise ProvisionError(f"{model.describe()}: {missing[0]} could not be downloaded again")
        bad = _damaged_blobs(snapshot)
        if bad:
            raise ProvisionError(f"{model.describe()}: {bad[0]} fails its SHA-256 twice")
    _write_manifest(model, settings, snapshot, {"commit": snapshot.name})
    if model.revision is None:
        logger.warning(
            "%s is not pinned: it resolved to commit %s; add `revision: %s` to the config",
            model.repo_id,
            snapshot.name,
            snapshot.name,
        )
    return snapshot


def hub_snapshot(model: HubModel, settings: Settings) -> Path:
    """The provisioned snapshot's directory, without any network access."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = _hub_snapshot_dir(model, local_only=True)
    except LocalEntryNotFoundError as e:
        raise ModelNotProvisionedError(
            f"{model.describe()} is not on the model cache: run `{settings.prefetch_command}`"
        ) from e
    _check_manifest(model, settings, snapshot)
    return snapshot


# --------------------------------------------------------------------------- checkpoints
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_checkpoint(
    ckpt: Checkpoint, settings: Settings, progress: Callable[[int, int | None], None] | None = None
) -> Path:
    """Download ``ckpt`` (resuming a ``.part`` file), check its SHA-256, move it into place."""
    import httpx

    target = Path(ckpt.path)
    if target.is_file() and _sha256(target) == ckpt.sha256:
        _write_manifest(ckpt, settings, target, {"sha256": ckpt.sha256})
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with httpx.stream(
        "GET", ckpt.url, headers=headers, follow_redirects=True, timeout=60
    ) as response:
        if response.status_code == 416:  # the part file is already whole
            pass
        elif response.status_code == 206 and have:
            _append(response, part, have, progress)
        elif response.status_code == 200:  # no range support: start over
            _append(response, part, 0, progress)
        else:
            raise ProvisionError(f"{ckpt.url}: HTTP {response.status_code}")
    got = _sha256(part)
    if got != ckpt.sha256:
        part.unlink()
        raise ProvisionError(
            f"{ckpt.url}: SHA-256 {got} is not the pinned {ckpt.sha256}; the partial file "
            "was removed, run the prefetch again"
        )
    part.replace(target)
    _write_manifest(ckpt, settings, target, {"sha256": ckpt.sha256})
    return target


def _append(
    response: Any, part: Path, offset: int, progress: Callable[[int, int | None], None] | None
) -> None:
    length = response.headers.get("content-length")
    total = offset + int(length) if length is not None else None
    done = offset
    with part.open("ab" if offset else "wb") as f:
        for chunk in response.iter_bytes():  # as received: an interruption keeps them
            f.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)


def checkpoint(ckpt: Checkpoint, settings: Settings) -> Path:
    """The provisioned checkpoint's path (checked against its manifest, no hashing)."""
    target = Path(ckpt.path)
    _check_manifest(ckpt, settings, target)
    return target


# --------------------------------------------------------------------------- both
def prefetch(
    items: Iterable[Asset], settings: Settings | None = None, token: str | None = None
) -> list[Path]:
    """Download and verify every asset; where each now is."""
    settings = settings or Settings()
    token = token or os.environ.get("HF_TOKEN") or None
    paths = []
    for asset in items:
        print(f"prefetch: {asset.describe()}", file=sys.stderr, flush=True)
        if isinstance(asset, HubModel):
            paths.append(fetch_hub(asset, settings, token))
        else:
            paths.append(fetch_checkpoint(asset, settings, _printer(asset)))
    return paths


def check(items: Iterable[Asset], settings: Settings | None = None) -> list[Path]:
    """Every asset's provisioned path; :class:`ModelNotProvisionedError` for the first
    that is missing or damaged."""
    settings = settings or Settings()
    return [
        hub_snapshot(a, settings) if isinstance(a, HubModel) else checkpoint(a, settings)
        for a in items
    ]


def _printer(ckpt: Checkpoint) -> Callable[[int, int | None], None]:
    last = [-1]

    def show(done: int, total: int | None) -> None:
        percent = int(100 * done / total) if total else -1
        if percent != last[0] and (percent % 5 == 0 or percent < 0):
            last[0] = percent
            size = f"{done / 2**20:.0f} MiB" + (f" / {total / 2**20:.0f} MiB" if total else "")
            print(f"  {Path(ckpt.path).name}: {size}", file=sys.stderr, flush=True)

    return show


def args_from_serve_config(path: Path) -> AppArgsBase:
    from .config import load_serve_config
    from .registry import AppArgs

    apps = load_serve_config(path).get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one Serve application, got {len(apps)}")
    return AppArgs.model_validate(apps[0].get("args") or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_apps.provision", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="a Serve config file")
    source.add_argument("--args-json", help="the Serve application's args: as JSON")
    parser.add_argument("--check", action="store_true", help="verify only, download nothing")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if ns.config is not None:
        args = args_from_serve_config(ns.config)
    else:
        from .registry import AppArgs

        args = AppArgs.model_validate(json.loads(ns.args_json))
    items = assets(args)
    try:
        paths = check(items) if ns.check else prefetch(items)
    except (ModelNotProvisionedError, ProvisionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for asset, path in zip(items, paths, strict=True):
        print(f"ok  {asset.describe()}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
