"""Checkpoints: ``config.json`` + ``model.safetensors`` (+ ``metrics.json``) + ``manifest.json``,
never pickle.

Lookup order for ``load(dataset, model)``:

1. ``$REGISTRATION_CHECKPOINTS/<dataset>/<model>/`` (default: ``checkpoints/`` in this repo);
2. the Hugging Face Hub repo ``$REGISTRATION_HUB_REPO`` (default: :data:`HUB`'s ``repo_id``) at
   revision ``$REGISTRATION_HUB_REVISION`` (default: :data:`HUB`'s ``revision`` for that repo,
   ``main`` for any other), files ``<dataset>/<model>/…``.
   ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` are honoured by ``huggingface_hub``.

Integrity: :func:`save` writes ``manifest.json`` (sha256 and byte size of every other file), and
:func:`load_folder` checks it before reading anything, raising :class:`IntegrityError` on a
mismatch or on any pickle-style file (``.pt .pth .pkl .pickle .ckpt .bin``) in the folder. A
folder without a manifest (made by hand) still loads, with an :class:`UnverifiedCheckpointWarning`.

The Hub fallback fails fast when the endpoint does not answer: one HEAD request without retries
(timeout :data:`HUB_ETAG_TIMEOUT_S` s) decides whether to download or to use only the local HF
cache; otherwise ``huggingface_hub`` itself would retry a refused connection for ~20 s. Unless
they are already set, ``HF_HUB_ETAG_TIMEOUT`` and ``HF_HUB_DOWNLOAD_TIMEOUT`` are given short
defaults before ``huggingface_hub`` is first imported (it reads them once, at import time).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as cfgmod

if TYPE_CHECKING:  # torch is imported lazily, so the manifest / Hub helpers stay light
    import torch

# The Hub copy of the weights this code is tested with: downloads are pinned to this revision,
# recorded beside the repo id, so a later push to the repo cannot change what an existing
# install loads. The revision is a tag (or a commit sha) that is never moved: after
# ``python -m registration.hub push …``, tag that commit with it (``HfApi.create_tag``), or
# record the new commit sha here. Loading pins every file to the one commit this resolves to.
HUB = {"repo_id": "localize-segment-match/checkpoints", "revision": "v1"}
DEFAULT_REPO = HUB["repo_id"]
FILES = ("config.json", "model.safetensors")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "registration-checkpoint-manifest/1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
HUB_ETAG_TIMEOUT_S = 3       # default HF_HUB_ETAG_TIMEOUT (HEAD requests), seconds
HUB_DOWNLOAD_TIMEOUT_S = 5   # default HF_HUB_DOWNLOAD_TIMEOUT (per-read on GET), seconds
REPO_ROOT = Path(__file__).resolve().parent.parent

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


class CheckpointNotFound(FileNotFoundError):
    pass


class IntegrityError(ValueError):
    """A checkpoint folder whose files do not match its manifest, or that holds pickle files."""


class UnverifiedCheckpointWarning(UserWarning):
    """Loaded a checkpoint folder that has no ``manifest.json``."""


class _HubUnavailable(Exception):
    """The Hub could not be asked and the HF cache has no copy (message says why)."""


def local_root() -> Path:
    return Path(os.environ.get("REGISTRATION_CHECKPOINTS", REPO_ROOT / "checkpoints"))


def hub_repo() -> tuple[str, str]:
    """(repo id, revision) to download from: :data:`HUB` unless ``$REGISTRATION_HUB_REPO`` /
    ``$REGISTRATION_HUB_REVISION`` say otherwise. The pinned revision belongs to the pinned
    repo; another repo without an explicit revision is read at ``main``."""
    repo = os.environ.get("REGISTRATION_HUB_REPO") or HUB["repo_id"]
    default_rev = HUB["revision"] if repo == HUB["repo_id"] else "main"
    return repo, os.environ.get("REGISTRATION_HUB_REVISION") or default_rev


# ---------------------------------------------------------------------------------------------
# manifest


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_manifest(folder: str | os.PathLike) -> dict:
    """``{"format": …, "files": {name: {"sha256": hex, "size": bytes}}}`` for every regular file
    directly in ``folder`` except ``manifest.json`` itself."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return {"format": MANIFEST_FORMAT, "files": files}


def write_manifest(folder: str | os.PathLike) -> Path:
    """(Re)write ``folder/manifest.json`` from the files now in the folder, e.g. for a checkpoint
    assembled by hand. Refuses folders holding pickle files."""
    folder = Path(folder)
    _refuse_pickles(folder)
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    _write_text(tmp, json.dumps(make_manifest(folder), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _valid_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST)
            and "/" not in name and "\\" not in name and not name.startswith("."))


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The parsed ``manifest.json`` of ``folder``, or None if it has none.
    Raises :class:`IntegrityError` when the manifest is malformed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from None
    files = d.get("files") if isinstance(d, dict) else None
    if not isinstance(files, dict):
        raise IntegrityError(f"{path}: expected an object with a 'files' mapping")
    for name, entry in files.items():
        if not _valid_name(name):
            raise IntegrityError(f"{path}: invalid file name {name!r}")
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise IntegrityError(f"{path}: lists pickle file {name!r}; checkpoints are "
                                 "safetensors only")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int)):
            raise IntegrityError(f"{path}: entry for {name!r} needs 'sha256' (hex) and 'size'")
    return d


def _refuse_pickles(folder: Path) -> None:
    bad = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                 if p.name.lower().endswith(PICKLE_SUFFIXES))
    if bad:
        raise IntegrityError(
            f"{folder}: refusing a checkpoint folder that holds pickle-format file(s) "
            f"{', '.join(bad)}; pickle can run arbitrary code on load. Checkpoints are "
            f"config.json + model.safetensors only: remove the file(s) or use another folder.")


def verify_folder(folder: str | os.PathLike) -> dict | None:
    """Check ``folder`` against its ``manifest.json`` without loading anything.

    Raises :class:`IntegrityError` if the folder holds a pickle-style file, if a listed file is
    missing or differs in size or sha256, or if the manifest does not cover config.json and
    model.safetensors. Files not listed (e.g. a Hub README.md) are not read by the loader and are
    allowed. Without a manifest, warns (:class:`UnverifiedCheckpointWarning`) and returns None.
    """
    folder = Path(folder)
    _refuse_pickles(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        warnings.warn(f"{folder} has no {MANIFEST}: loading it without an integrity check "
                      "(write one with registration.checkpoint.write_manifest)",
                      UnverifiedCheckpointWarning, stacklevel=3)
        return None
    files = manifest["files"]
    unlisted = [f for f in FILES if f not in files]
    if unlisted:
        raise IntegrityError(f"{folder}/{MANIFEST} does not cover {', '.join(unlisted)}")
    for name, entry in files.items():
        p = folder / name
        if not p.is_file():
            raise IntegrityError(f"{p}: listed in {MANIFEST} but missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise IntegrityError(f"{p}: size {size} bytes, but {MANIFEST} says {entry['size']}; "
                                 "the file is truncated or was modified")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise IntegrityError(f"{p}: sha256 {digest} does not match {MANIFEST} "
                                 f"({entry['sha256']}); the file was modified or corrupted")
    return manifest


# ---------------------------------------------------------------------------------------------
# save


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: str | os.PathLike, model: "torch.nn.Module", cfg,
         metrics: dict | None = None) -> Path:
    """Write config.json, model.safetensors, metrics.json and manifest.json atomically (temp dir,
    then rename), so an interrupted or failed save never leaves a half-written checkpoint behind
    and never damages the checkpoint already in ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        _fsync(tmp / "model.safetensors")
        _write_text(tmp / "config.json", cfgmod.dumps(cfg) + "\n")
        if metrics is not None:
            _write_text(tmp / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        _write_text(tmp / MANIFEST, json.dumps(make_manifest(tmp), indent=2, sort_keys=True) + "\n")
        if folder.exists():
            old = folder.parent / f".{folder.name}.tmp-old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------
# Hub


def _hf_timeout(var: str, default: int) -> float:
    try:
        v = int(os.environ.get(var) or default)
    except ValueError:
        v = default
    return float(v if v > 0 else default)


def _import_hf():
    """Import huggingface_hub, giving it short timeouts unless the user set some. It reads
    HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT (and HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE)
    only once, when ``huggingface_hub.constants`` is first imported."""
    if "huggingface_hub.constants" not in sys.modules:
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HUB_ETAG_TIMEOUT_S))
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_DOWNLOAD_TIMEOUT_S))
    import huggingface_hub
    return huggingface_hub


def _first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (huggingface_hub messages span several)."""
    s = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    s = s if len(s) <= limit else s[:limit - 1] + "…"
    return f"{type(e).__name__}: {s}" if s else type(e).__name__


def _hub_probe(hf, repo: str, rev: str, filename: str, timeout: float) -> BaseException | None:
    """One HEAD request, no retries. None if the Hub answered; the error if it could not be
    reached (refused, timeout, 5xx, …). Definite answers (no such repo / revision / file,
    unauthorized) are raised."""
    from huggingface_hub.errors import HfHubHTTPError

    url = hf.hf_hub_url(repo, filename, revision=rev)
    try:
        hf.get_hf_file_metadata(url, timeout=timeout)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            raise
        return e
    except Exception as e:  # httpx2.ConnectError / TimeoutException / protocol errors
        return e
    return None


def _hub_fetch(dataset: str, model: str) -> Path:
    hf = _import_hf()
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    repo, rev = hub_repo()
    prefix = f"{dataset}/{model}"
    timeout = _hf_timeout("HF_HUB_ETAG_TIMEOUT", HUB_ETAG_TIMEOUT_S)
    endpoint = constants.ENDPOINT
    cache = constants.HF_HUB_CACHE

    if constants.is_offline_mode():
        why = "HF_HUB_OFFLINE is set"
    else:
        err = _hub_probe(hf, repo, rev, f"{prefix}/config.json", timeout)
        why = None if err is None else f"{endpoint} did not answer ({_first_line(err)})"
    local_only = why is not None

    def get(name: str, revision: str) -> Path:
        return Path(hf.hf_hub_download(repo_id=repo, filename=f"{prefix}/{name}",
                                       revision=revision, etag_timeout=timeout,
                                       local_files_only=local_only))

    try:
        cfg_path = get("config.json", rev)
    except LocalEntryNotFoundError:
        if local_only:
            raise _HubUnavailable(f"{why}, and the HF cache {cache} has no copy") from None
        raise
    # pin the remaining files to the commit config.json came from (…/snapshots/<commit>/<prefix>/)
    commit = cfg_path.parents[len(prefix.split("/"))].name
    commit = commit if _COMMIT_RE.fullmatch(commit) else rev

    absent = (RemoteEntryNotFoundError, LocalEntryNotFoundError) if local_only else \
        (RemoteEntryNotFoundError,)
    try:
        get(MANIFEST, commit)  # optional: hand-made Hub folders may lack it
        manifest = read_manifest(cfg_path.parent)
    except absent:
        manifest = None
    names = list(manifest["files"]) if manifest else list(FILES)
    for name in names:
        if name != "config.json":
            try:
                get(name, commit)
            except LocalEntryNotFoundError:
                if local_only:
                    raise _HubUnavailable(f"{why}, and the HF cache {cache} has no copy of "
                                          f"{prefix}/{name}") from None
                raise
    return cfg_path.parent


def resolve(dataset: str, model: str) -> Path:
    """Folder holding the checkpoint: local if present, else downloaded from the Hub."""
    local = local_root() / dataset / model
    if all((local / f).is_file() for f in FILES):
        return local
    repo, rev = hub_repo()
    try:
        return _hub_fetch(dataset, model)
    except IntegrityError:
        raise
    except Exception as e:  # network down, offline mode, missing repo or file
        reason = str(e) if isinstance(e, _HubUnavailable) else _first_line(e)
        raise CheckpointNotFound(
            f"checkpoint {dataset}/{model} not found: not in {local} and not on the Hub "
            f"({repo}@{rev}: {reason})"
        ) from e


# ---------------------------------------------------------------------------------------------
# load


def read_config(folder: Path):
    d = json.loads((Path(folder) / "config.json").read_text())
    kind = d.get("kind")
    if kind not in cfgmod.CONFIGS:
        raise ValueError(f"{folder}/config.json: expected kind in {sorted(cfgmod.CONFIGS)}, "
                         f"got {kind!r}")
    return cfgmod.from_dict(cfgmod.CONFIGS[kind], d)


def build(cfg) -> "torch.nn.Module":
    if cfg.kind == "matcher":
        from .matcher import Matcher
        return Matcher(cfg)
    if cfg.kind == "localizer":
        from .localizer import Localizer
        return Localizer(cfg)
    if cfg.kind == "segnet":
        from .segnet import SegNet
        return SegNet(cfg)
    if cfg.kind == "verifier":
        from .verify import Verifier
        return Verifier(cfg)
    if cfg.kind == "ranker":
        from .ranker import Ranker
        return Ranker(cfg)
    raise ValueError(f"unknown model kind {cfg.kind!r}")


def load_folder(folder: str | os.PathLike) -> "torch.nn.Module":
    """Verify the folder (:func:`verify_folder`), build the model from config.json and load
    model.safetensors strictly; eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    verify_folder(folder)
    cfg = read_config(folder)
    model = build(cfg)
    state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load(dataset: str, model: str) -> "torch.nn.Module":
    return load_folder(resolve(dataset, model))


def try_load(dataset: str, model: str) -> "torch.nn.Module | None":
    """Like :func:`load`, but warns and returns None when the checkpoint is nowhere."""
    try:
        return load(dataset, model)
    except CheckpointNotFound as e:
        warnings.warn(str(e), stacklevel=2)
        return None
