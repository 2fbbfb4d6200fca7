"""Checkpoint save/load, integrity manifest, and the Hub fallback against a local fake Hub.

The Hub tests run ``registration.checkpoint.load`` in a subprocess: ``huggingface_hub`` reads
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME`` and its timeouts once, at import time, so each
scenario needs a fresh interpreter with its own environment. Nothing is mocked there: the real
``hf_hub_download`` talks HTTP to a ``ThreadingHTTPServer`` on 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from registration import checkpoint as ck
from registration.config import MatcherConfig

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
HUB_REPO = "test-org/checkpoints"
TINY = MatcherConfig(grid_size=2, channels=(4, 4, 4), hidden=8)
METRICS = {"command": "python -m registration.train matcher --steps 3 --grid 2",
           "val_dice": 0.8123, "wall_time_s": 1.5, "log": [{"step": 3, "val_dice": 0.8123}]}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = ck.build(TINY)
    with torch.no_grad():  # the head starts at zero; make every weight distinctive
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def saved(tmp_path) -> tuple[Path, torch.nn.Module]:
    m = tiny_model()
    folder = ck.save(tmp_path / "ckpts" / "mnist" / "tiny", m, TINY, METRICS)
    return folder, m


# ---------------------------------------------------------------------------------------------
# local save / load / integrity


def test_roundtrip(saved):
    folder, m = saved
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "manifest.json", "metrics.json", "model.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["config.json", "metrics.json", "model.safetensors"]
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    assert ck.read_config(folder) == TINY
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified folder loads without warnings
        loaded = ck.load_folder(folder)
    assert not loaded.training
    assert loaded.cfg == TINY
    assert_same_state(loaded.state_dict(), m.state_dict())
    assert json.loads((folder / "metrics.json").read_text()) == METRICS


def test_load_prefers_local_root(saved, monkeypatch):
    folder, m = saved
    monkeypatch.setenv("REGISTRATION_CHECKPOINTS", str(folder.parent.parent))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never used
    assert ck.resolve("mnist", "tiny") == folder
    assert_same_state(ck.load("mnist", "tiny").state_dict(), m.state_dict())


class ExplodingStateDict(torch.nn.Module):
    def state_dict(self, *args, **kwargs):
        raise RuntimeError("boom in state_dict")


def test_failed_save_keeps_existing_checkpoint(saved, monkeypatch):
    folder, m = saved
    before = folder_digest(folder)
    with pytest.raises(RuntimeError, match="boom in state_dict"):
        ck.save(folder, ExplodingStateDict(), TINY, {"command": "new"})

    import safetensors.torch

    def half_write(state, path, *a, **k):  # a crash half-way through writing the weights
        Path(path).write_bytes(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        ck.save(folder, tiny_model(1), TINY, {"command": "new"})

    assert folder_digest(folder) == before
    assert [p.name for p in folder.parent.iterdir()] == ["tiny"]  # no temp dirs left behind
    assert_same_state(ck.load_folder(folder).state_dict(), m.state_dict())


def test_resave_replaces_checkpoint(saved):
    folder, _ = saved
    m2 = tiny_model(1)
    ck.save(folder, m2, TINY)
    assert not (folder / "metrics.json").exists()
    assert [p.name for p in folder.parent.iterdir()] == ["tiny"]
    assert_same_state(ck.load_folder(folder).state_dict(), m2.state_dict())


def test_tampered_safetensors_refused(saved):
    folder, _ = saved
    p = folder / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # same size, one weight byte changed
    p.write_bytes(bytes(data))
    with pytest.raises(ck.IntegrityError, match=r"model\.safetensors.*sha256"):
        ck.load_folder(folder)
    p.write_bytes(bytes(data[:-4]))
    with pytest.raises(ck.IntegrityError, match=r"model\.safetensors.*size"):
        ck.load_folder(folder)


def test_pickle_file_refused(saved):
    folder, _ = saved
    (folder / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(ck.IntegrityError, match=r"evil\.pkl.*pickle|pickle.*evil\.pkl"):
        ck.load_folder(folder)
    with pytest.raises(ck.IntegrityError):
        ck.write_manifest(folder)


def test_folder_without_manifest_warns(saved):
    folder, m = saved
    (folder / "manifest.json").unlink()
    with pytest.warns(ck.UnverifiedCheckpointWarning, match="no manifest.json"):
        loaded = ck.load_folder(folder)
    assert_same_state(loaded.state_dict(), m.state_dict())
    ck.write_manifest(folder)
    assert ck.verify_folder(folder) is not None


# ---------------------------------------------------------------------------------------------
# a fake Hugging Face Hub, as seen by huggingface_hub 2.4 hf_hub_download


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub(ThreadingHTTPServer):
    """Serves ``files`` ({path in repo: bytes}) of one model repo like huggingface.co:

    * ``HEAD|GET /{repo_id}/resolve/{revision}/{path}`` with ``revision`` one of ``refs``
      (default "main") or the commit:
      regular files answer 200 with ``X-Repo-Commit``, ``ETag`` (git blob sha1) and
      ``Content-Length``; ``*.safetensors`` are LFS files: 302 to a CDN URL on another host name
      (``localhost`` instead of ``127.0.0.1``, so huggingface_hub neither follows the HEAD
      redirect nor sends auth there) with ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and
      ``X-Repo-Commit``;
    * ``HEAD|GET /cdn/{sha256}``: the LFS blob;
    * errors as the Hub signals them, via ``X-Error-Code``: ``EntryNotFound`` (404, with
      ``X-Repo-Commit``), ``RevisionNotFound`` (404), ``RepoNotFound`` (401).
    """

    daemon_threads = True

    def __init__(self, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repo_id, self.files = repo_id, files
        self.refs = refs                 # branch / tag names that resolve to the one commit
        self.commit = hashlib.sha1(json.dumps(sorted(files)).encode()).hexdigest()
        self.blobs = {hashlib.sha256(d).hexdigest(): d
                      for f, d in files.items() if f.endswith(".safetensors")}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self.serve()

    def do_GET(self):
        self.serve()

    def reply(self, code: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def serve(self):
        hub = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        with hub.lock:
            hub.requests.append((self.command, path))
        if path.startswith("/cdn/"):
            blob = hub.blobs.get(path[len("/cdn/"):])
            if blob is None:
                return self.reply(404)
            return self.reply(200, blob, {"Content-Type": "application/octet-stream"})
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve" or "/".join(parts[:2]) != hub.repo_id:
            return self.reply(401, b"repo not found", {"X-Error-Code": "RepoNotFound"})
        rev, name = parts[3], "/".join(parts[4:])
        if rev not in (*hub.refs, hub.commit):
            return self.reply(404, b"", {"X-Error-Code": "RevisionNotFound"})
        headers = {"X-Repo-Commit": hub.commit}
        data = hub.files.get(name)
        if data is None:
            return self.reply(404, b"", {**headers, "X-Error-Code": "EntryNotFound"})
        if name.endswith(".safetensors"):
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\n" \
                      f"size {len(data)}\n".encode()
            return self.reply(302, b"", {
                **headers, "Location": f"http://localhost:{hub.server_port}/cdn/{sha}",
                "ETag": f'"{git_blob_sha1(pointer)}"', "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data))})
        return self.reply(200, data, {**headers, "ETag": f'"{git_blob_sha1(data)}"',
                                      "Content-Type": "text/plain; charset=utf-8"})


@pytest.fixture
def fake_hub(saved):
    folder, m = saved
    files = {f"mnist/tiny/{p.name}": p.read_bytes() for p in folder.iterdir()}
    # same weights, one byte changed, original manifest: must be refused after download
    bad = bytearray(files["mnist/tiny/model.safetensors"])
    bad[-1] ^= 0xFF
    files.update({f"mnist/tampered/{n}": files[f"mnist/tiny/{n}"]
                  for n in ("config.json", "manifest.json", "metrics.json")})
    files["mnist/tampered/model.safetensors"] = bytes(bad)
    # a hand-made folder without manifest: loads, with a warning
    files.update({f"mnist/bare/{n}": files[f"mnist/tiny/{n}"] for n in ck.FILES})
    hub = FakeHub(HUB_REPO, files)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, m
    finally:
        hub.shutdown()
        hub.server_close()


LOAD_SCRIPT = r"""
import json, sys, time, warnings
from registration import checkpoint as ck
# import everything a load touches before the clock starts, so "elapsed" is the load itself
# (the Hub round trips or their absence), not interpreter work that a slow host stretches
import torch, safetensors.torch
hf = ck._import_hf()
hf.hf_hub_url, hf.get_hf_file_metadata, hf.hf_hub_download
from registration import localizer, matcher, ranker, segnet, verify
results = []
for name in sys.argv[2:]:
    dataset, model = name.split("/")
    r = {"name": name}
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            m = ck.load(dataset, model)
        except Exception as e:
            r.update(error=type(e).__name__, message=str(e))
        else:
            from safetensors.torch import save_file
            out = f"{sys.argv[1]}/{dataset}-{model}.safetensors"
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out)
            r["weights"] = out
    r["elapsed"] = time.monotonic() - t0
    r["warnings"] = [str(w.message) for w in caught]
    results.append(r)
print(json.dumps(results))
"""


def run_load(tmp_path: Path, names: list[str], endpoint: str | None, hf_home: Path,
             **env_extra: str | None) -> dict[str, dict]:
    """``checkpoint.load`` for each DATASET/MODEL in a fresh interpreter; results by name."""
    drop = ("HF_", "HUGGING_FACE", "HUGGINGFACE", "TRANSFORMERS_OFFLINE", "REGISTRATION_")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(drop)
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    empty = tmp_path / "no-local-checkpoints"
    empty.mkdir(exist_ok=True)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    settings = dict(PYTHONPATH=str(REPO), HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"),
                    REGISTRATION_CHECKPOINTS=str(empty), REGISTRATION_HUB_REPO=HUB_REPO,
                    REGISTRATION_HUB_REVISION="main", HF_HUB_DISABLE_TELEMETRY="1",
                    HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
                    OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    settings.update(env_extra)      # a value of None leaves the variable unset
    env.update({k: v for k, v in settings.items() if v is not None})
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(out), *names], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


def test_hub_download_via_hf_hub_download(fake_hub, tmp_path):
    hub, m = fake_hub
    hf_home = tmp_path / "hf"
    res = run_load(tmp_path, ["mnist/tiny", "mnist/tampered", "mnist/bare", "mnist/nope"],
                   hub.url, hf_home)

    good = res["mnist/tiny"]
    assert "error" not in good, good
    assert good["warnings"] == []  # manifest downloaded and verified
    assert_same_state(load_file(good["weights"]), m.state_dict())
    snap = hf_home / "hub" / "models--test-org--checkpoints" / "snapshots" / hub.commit
    assert sorted(p.name for p in (snap / "mnist" / "tiny").iterdir()) == [
        "config.json", "manifest.json", "metrics.json", "model.safetensors"]

    sha = hashlib.sha256(hub.files["mnist/tiny/model.safetensors"]).hexdigest()
    base = f"/{HUB_REPO}/resolve"
    for request in [("HEAD", f"{base}/main/mnist/tiny/config.json"),
                    ("GET", f"{base}/main/mnist/tiny/config.json"),
                    ("HEAD", f"{base}/{hub.commit}/mnist/tiny/manifest.json"),
                    ("GET", f"{base}/{hub.commit}/mnist/tiny/manifest.json"),
                    ("HEAD", f"{base}/{hub.commit}/mnist/tiny/model.safetensors"),
                    ("GET", f"/cdn/{sha}"),
                    ("GET", f"{base}/{hub.commit}/mnist/tiny/metrics.json")]:
        assert request in hub.requests, (request, hub.requests)
    assert all(p.startswith((base + "/", "/cdn/")) for _, p in hub.requests), hub.requests

    bad = res["mnist/tampered"]
    assert bad["error"] == "IntegrityError", bad
    assert "model.safetensors" in bad["message"]

    bare = res["mnist/bare"]
    assert "error" not in bare, bare
    assert any("no manifest.json" in w for w in bare["warnings"])
    assert_same_state(load_file(bare["weights"]), m.state_dict())

    missing = res["mnist/nope"]
    assert missing["error"] == "CheckpointNotFound"
    assert f"{HUB_REPO}@main" in missing["message"] and "EntryNotFound" in missing["message"]
    assert "mnist/nope/config.json" in missing["message"]

    # the endpoint now refuses connections: the cached copy is used, without retry delays
    n = len(hub.requests)
    again = run_load(tmp_path, ["mnist/tiny"], f"http://127.0.0.1:{closed_port()}", hf_home)
    r = again["mnist/tiny"]
    assert "error" not in r, r
    assert r["elapsed"] < 5
    assert_same_state(load_file(r["weights"]), m.state_dict())
    assert len(hub.requests) == n


def test_hub_revision_is_pinned_beside_the_repo_id(monkeypatch):
    assert set(ck.HUB) == {"repo_id", "revision"}
    assert ck.HUB["revision"] not in ("", "main"), "a pin is a tag or a commit, not a branch"
    monkeypatch.delenv("REGISTRATION_HUB_REPO", raising=False)
    monkeypatch.delenv("REGISTRATION_HUB_REVISION", raising=False)
    assert ck.hub_repo() == (ck.HUB["repo_id"], ck.HUB["revision"])
    monkeypatch.setenv("REGISTRATION_HUB_REPO", "someone/else")   # the pin is that repo's only
    assert ck.hub_repo() == ("someone/else", "main")
    monkeypatch.setenv("REGISTRATION_HUB_REVISION", "0123abc")
    assert ck.hub_repo() == ("someone/else", "0123abc")


def test_default_download_asks_for_the_pinned_revision(saved, tmp_path):
    """With no REGISTRATION_HUB_* variables, every request names the pinned revision (or the
    commit it resolved to); the fake repo answers only to that tag, not to main."""
    folder, m = saved
    files = {f"mnist/tiny/{p.name}": p.read_bytes() for p in folder.iterdir()}
    hub = FakeHub(ck.HUB["repo_id"], files, refs=(ck.HUB["revision"],))
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        res = run_load(tmp_path, ["mnist/tiny"], hub.url, tmp_path / "hf",
                       REGISTRATION_HUB_REPO=None, REGISTRATION_HUB_REVISION=None)
    finally:
        hub.shutdown()
        hub.server_close()
    r = res["mnist/tiny"]
    assert "error" not in r, r
    assert_same_state(load_file(r["weights"]), m.state_dict())
    base = f"/{ck.HUB['repo_id']}/resolve"
    assert ("HEAD", f"{base}/{ck.HUB['revision']}/mnist/tiny/config.json") in hub.requests
    assert ("GET", f"{base}/{ck.HUB['revision']}/mnist/tiny/config.json") in hub.requests
    revs = {p[len(base) + 1:].split("/")[0] for _, p in hub.requests if p.startswith(base)}
    assert revs == {ck.HUB["revision"], hub.commit}, hub.requests


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def assert_not_found_both_places(r: dict, tmp_path: Path) -> None:
    assert r["error"] == "CheckpointNotFound", r
    assert str(tmp_path / "no-local-checkpoints" / "mnist" / "tiny") in r["message"]
    assert f"{HUB_REPO}@main" in r["message"]


def test_offline_without_cache(tmp_path):
    r = run_load(tmp_path, ["mnist/tiny"], None, tmp_path / "hf", HF_HUB_OFFLINE="1")
    r = r["mnist/tiny"]
    assert_not_found_both_places(r, tmp_path)
    assert "HF_HUB_OFFLINE" in r["message"]


def test_closed_port_fails_fast(tmp_path):
    t0 = time.monotonic()
    r = run_load(tmp_path, ["mnist/tiny"], f"http://127.0.0.1:{closed_port()}", tmp_path / "hf")
    r = r["mnist/tiny"]
    assert_not_found_both_places(r, tmp_path)
    assert "Connection refused" in r["message"] or "ConnectError" in r["message"]
    assert r["elapsed"] < 5, r
    assert time.monotonic() - t0 < 30  # whole subprocess, interpreter start included


def test_silent_endpoint_times_out_fast(tmp_path):
    """A port that accepts connections but never answers: the HEAD times out (3 s default)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        r = run_load(tmp_path, ["mnist/tiny"], f"http://127.0.0.1:{s.getsockname()[1]}",
                     tmp_path / "hf")
    r = r["mnist/tiny"]
    assert_not_found_both_places(r, tmp_path)
    assert "Timeout" in r["message"]
    assert r["elapsed"] < 5, r


# ---------------------------------------------------------------------------------------------
# registration.hub


def test_hub_card_cli(saved):
    folder, _ = saved
    proc = subprocess.run([sys.executable, "-m", "registration.hub", "card", str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    card = proc.stdout
    assert METRICS["command"] in card
    assert "| val_dice | 0.8123 |" in card
    assert "| wall_time_s | 1.5 |" in card
    assert "mnist/tiny" in card and "matcher" in card
    assert "| grid_size | 2 |" in card
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] in card


def test_hub_push_refuses_tampered_folder(saved, capsys):
    from registration import hub

    folder, _ = saved
    (folder / "evil.pkl").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        hub.main(["push", str(folder), "someone/repo"])
    assert e.value.code == 1
    assert "evil.pkl" in capsys.readouterr().err
