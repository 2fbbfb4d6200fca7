"""The app as an MCP server (issue 10, item 7): the schema lists a typed, documented
``register`` tool, and an MCP client over loopback (streamable HTTP) lists the tools and calls
it on a sample pair, getting the same Dice as through gradio_client."""
from __future__ import annotations

import ast
import asyncio
import base64
from pathlib import Path

import httpx
import pytest

from apphelpers import app_server, examples  # noqa: F401  (app_server is a fixture)
from conftest import needs_pipeline

pytestmark = needs_pipeline
pytest.importorskip("mcp", reason="the mcp package (gradio[mcp]) is not installed")

PAIR = next(e for e in examples() if e["caption"].startswith("3 distractors, big"))


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_schema_lists_the_register_tool(app_server):  # noqa: F811
    r = httpx.get(f"{app_server.url}gradio_api/mcp/schema", timeout=30)
    assert r.status_code == 200, r.text[:300]
    tools = {t["name"]: t for t in r.json()}
    assert list(tools) == ["register"]
    tool = tools["register"]
    assert "Dice" in tool["description"] and "localization" in tool["description"]
    props = tool["inputSchema"]["properties"]
    assert set(props) == {"dataset", "moving", "fixed", "moving_mask", "fixed_mask"}
    assert props["dataset"]["enum"] == ["mnist", "silhouettes", "usct"]
    assert props["dataset"]["default"] == "mnist"
    for name in props:
        assert props[name].get("description"), f"{name} is not documented"
    assert props["moving"]["type"] == "string"                  # a URL or a data: URL
    assert set(tool["inputSchema"]["required"]) == {"moving", "fixed"}   # masks are optional


async def _call_over_mcp(url: str, with_progress: bool):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client
    steps = []

    async def on_progress(progress, total, message):
        steps.append(message)

    async with streamablehttp_client(url, timeout=60) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            result = await session.call_tool(
                "register", {"dataset": "mnist", "moving": data_url(PAIR["moving"]),
                             "fixed": data_url(PAIR["fixed"])},
                progress_callback=on_progress if with_progress else None)
            return [t.name for t in tools.tools], result, steps


def _numbers(text: str) -> dict:
    """The JSON output as the MCP text shows it (a Python literal: Gradio formats it with str)."""
    i = text.rindex("{'dice'")
    return ast.literal_eval(text[i:text.index("}", text.index("'request_ms'", i)) + 1])


@pytest.fixture(scope="module")
def reference(app_server):  # noqa: F811
    from gradio_client import Client, handle_file
    client = Client(app_server.url, verbose=False, ssl_verify=False, download_files=False)
    return client.predict("mnist", handle_file(PAIR["moving"]), handle_file(PAIR["fixed"]),
                          api_name="/register")[-1]


def test_mcp_client_lists_and_calls_register(app_server, reference):  # noqa: F811
    """What most MCP clients do (no progress token): Gradio 6.31 answers with one text block
    holding all ten outputs: the headline, the pictures' URLs and the numbers."""
    names, result, _ = asyncio.run(asyncio.wait_for(
        _call_over_mcp(f"{app_server.url}gradio_api/mcp/", False), timeout=120))
    assert names == ["register"]
    assert not result.isError, result
    text = "\n".join(c.text for c in result.content if c.type == "text")
    assert "With localization Dice" in text
    assert text.count("/gradio_api/file=") >= 7          # the seven pictures, as URLs
    numbers = _numbers(text)
    assert numbers["dice"] == pytest.approx(reference["dice"], abs=1e-6) and numbers["dice"] >= 0.6
    assert numbers["box"] == reference["box"]


def test_mcp_call_with_progress_returns_the_pictures(app_server, reference):  # noqa: F811
    _, result, steps = asyncio.run(asyncio.wait_for(
        _call_over_mcp(f"{app_server.url}gradio_api/mcp/", True), timeout=120))
    assert not result.isError, result
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 7 and all(c.mimeType == "image/png" for c in images)
    assert all(base64.b64decode(c.data).startswith(b"\x89PNG") for c in images)
    assert steps, "no progress notifications"
    text = "\n".join(c.text for c in result.content if c.type == "text")
    assert _numbers(text)["dice"] == pytest.approx(reference["dice"], abs=1e-6)
