"""Exposure (issue 10): against the running app, every file-serving route Gradio 6 has refuses
/etc/passwd, the app's own files and ../ paths in plain and URL-encoded forms; uploads are capped
in bytes and cannot be written outside Gradio's upload folder; monitoring is off; messages
carry no server paths. Routes are those of gradio/routes.py (6.31): /gradio_api/file=…,
/gradio_api/file/…, /gradio_api/proxy=…, /gradio_api/upload, /static/…, /assets/…, /svelte/…,
/gradio_api/custom_component/…, /gradio_api/run-history/…/assets/…, /gradio_api/stream/…,
/gradio_api/mcp/…, /monitoring…; and the pre-4 /file=… spelling."""
from __future__ import annotations

import http.client
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from apphelpers import ROOT, app_server, examples  # noqa: F401  (app_server is a fixture)
from conftest import needs_pipeline

pytestmark = needs_pipeline
httpx = pytest.importorskip("httpx")

CAP_BYTES = 20 * 1024 * 1024           # app.MAX_FILE_SIZE = "20mb" (Gradio: MiB)
PAIR = next(e for e in examples() if e["caption"].startswith("3 distractors, big"))

SECRET_FILES = ["/etc/passwd", "/proc/self/environ", str(ROOT / "app.py"),
                str(ROOT / "checkpoints" / "mnist" / "matcher" / "model.safetensors")]
TRAVERSALS = [
    "/etc/passwd",
    "../../../../../../../../etc/passwd",
    "..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "%252e%252e%252f%252e%252e%252f%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "....//....//....//....//....//etc/passwd",
    "..\\..\\..\\..\\..\\..\\etc\\passwd",
    "//etc/passwd",
    "file:///etc/passwd",
    "app.py",
    "../app.py",
    "../../app.py",
]
ROUTES = [
    "/gradio_api/file={}", "/gradio_api/file/{}", "/file={}", "/static/{}", "/assets/{}",
    "/svelte/{}", "/gradio_api/custom_component/x/client/js/{}",
    "/gradio_api/run-history/records/register/x/assets/{}",
    "/gradio_api/stream/x/0/1/{}", "/gradio_api/mcp/{}",
]
SERVER_PATH = re.compile(r"/(?:work|root|home|usr|opt|srv)/|site-packages|\.pyenv")


def raw(url: str, method: str, path: str) -> tuple[int, bytes]:
    """One request with ``path`` sent exactly as written (no dot-segment normalisation)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_refused(status: int, body: bytes, what: str) -> None:
    assert 400 <= status < 500, f"{what}: HTTP {status}"
    assert b"root:" not in body and b"def register" not in body and b"PATH=" not in body, what
    assert not body.startswith(b"\x89PNG"), what


def test_file_routes_refuse_traversal_and_secrets(app_server):  # noqa: F811
    attempts = [r.format(t) for r in ROUTES for t in TRAVERSALS]
    attempts += [f"/gradio_api/file={p}" for p in SECRET_FILES]
    attempts += [f"/gradio_api/file/{p.lstrip('/')}" for p in SECRET_FILES]
    attempts += [f"/gradio_api/file={Path(e['fixed'])}" for e in examples()[:1]]  # app assets
    attempts += [f"/gradio_api/proxy={u}" for u in
                 (f"{app_server.url}config", "http://127.0.0.1:22/", "file:///etc/passwd")]
    attempts += [f"/gradio_api/file={app_server.url}config",
                 "/gradio_api/file=http://169.254.169.254/latest/meta-data/"]
    statuses = {}
    for path in attempts:
        for method in ("GET", "HEAD"):
            status, body = raw(app_server.url, method, path)
            assert_refused(status, body, f"{method} {path}")
            statuses[status] = statuses.get(status, 0) + 1
    print(f"{len(attempts) * 2} requests refused: HTTP {statuses}")


def _register(app_server):  # noqa: F811
    from gradio_client import Client, handle_file
    client = Client(app_server.url, verbose=False, ssl_verify=False, download_files=False)
    return client.predict("mnist", handle_file(PAIR["moving"]), handle_file(PAIR["fixed"]),
                          None, None, api_name="/register")


def test_outputs_are_served_but_nothing_beside_them(app_server):  # noqa: F811
    """A picture the app just made is served (so the refusals above are not a broken route);
    its folder, its siblings via ../ and its path with ../ tricks are not."""
    out = _register(app_server)
    url = out[1]["url"]
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    path = urlsplit(url).path                       # /gradio_api/file=/tmp/gradio/<h>/image.png
    served = path.split("file=", 1)[1]
    folder = served.rsplit("/", 1)[0]
    for probe in (folder, folder + "/", served + "/../../../../../../etc/passwd",
                  folder + "/../../../../../../../etc/passwd",
                  folder + "/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                  served.replace("/image", "/../image")):
        status, body = raw(app_server.url, "GET", f"/gradio_api/file={probe}")
        assert_refused(status, body, probe)


def test_upload_is_capped_in_bytes(app_server):  # noqa: F811
    up = f"{app_server.url}gradio_api/upload"
    small = httpx.post(up, files={"files": ("small.png", Path(PAIR["fixed"]).read_bytes())},
                       timeout=60)
    assert small.status_code == 200, small.text
    big = httpx.post(up, files={"files": ("big.png", b"\0" * (CAP_BYTES + 1024 * 1024))},
                     timeout=120)
    assert big.status_code == 413, (big.status_code, big.text[:200])
    assert "maximum" in big.text.lower()
    assert not SERVER_PATH.search(big.text), big.text


def test_upload_filename_cannot_escape_the_upload_folder(app_server, tmp_path):  # noqa: F811
    name = f"lsm-exposure-{uuid.uuid4().hex}.png"
    evil = f"../../../../../../../../tmp/{name}"
    r = httpx.post(f"{app_server.url}gradio_api/upload",
                   files={"files": (evil, Path(PAIR["fixed"]).read_bytes())}, timeout=60)
    assert r.status_code == 200, r.text
    (stored,) = r.json()
    assert ".." not in Path(stored).parts, stored
    assert not Path("/tmp", name).exists()
    assert Path(stored).name.endswith(".png") and Path(stored).resolve() != Path("/tmp", name)


def test_monitoring_is_off(app_server):  # noqa: F811
    for path in ("/monitoring", "/monitoring/summary", "/monitoring/guess",
                 "/gradio_api/monitoring", "/gradio_api/monitoring/summary"):
        status, body = raw(app_server.url, "GET", path)
        assert 400 <= status < 500, (path, status, body[:100])


def test_messages_and_public_config_carry_no_server_paths(app_server, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    client = Client(app_server.url, verbose=False, ssl_verify=False, download_files=False)
    with pytest.raises(AppError) as err:
        client.predict("mnist", handle_file(PAIR["moving"]), handle_file(str(bad)), None, None,
                       api_name="/register")
    assert not SERVER_PATH.search(str(err.value)) and "/tmp/" not in str(err.value)
    for path in ("/config", "/gradio_api/info", "/gradio_api/openapi.json"):
        status, body = raw(app_server.url, "GET", path)
        text = body.decode(errors="replace")
        if status == 200:
            assert str(ROOT) not in text, f"{path} names the app's folder"
            assert not re.search(r"site-packages|\.pyenv", text), path
