"""`sectionchat script` with HTTP API steps: examples/api/ against an in-process server that has an API key."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import API_KEY

from client.script import amain

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "api").glob("*.yaml"))
KEY = API_KEY


def options(api_app) -> list[str]:
    return ["--url", api_app.url, "--api-url", f"http://127.0.0.1:{api_app.api_port}", "--api-key", KEY]


def scenario(tmp_path: Path, text: str) -> str:
    path = tmp_path / "scenario.yaml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return str(path)


def test_the_example_is_there():
    assert [path.name for path in EXAMPLES] == ["backend.yaml"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
async def test_each_api_example_passes_twice(example: Path, api_app, capsys, tmp_path):
    record = tmp_path / "run.jsonl"
    for _ in range(2):  # ${run_id}: a second run against the same server meets none of the first one's data
        assert await amain([str(example), *options(api_app), "--record", str(record)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"PASS {example}") and len(out.splitlines()) == 1, out
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    calls = [entry for entry in entries if entry["client"] == "api"]
    assert {entry["direction"] for entry in calls} == {"send", "recv"}
    assert calls[1]["frame"]["status"] == 201


async def test_the_key_comes_from_the_environment_or_the_file(api_app, capsys, tmp_path, monkeypatch):
    path = scenario(
        tmp_path,
        f"""
        clients: {{alice: {{}}}}
        api: {{key: {KEY}}}
        steps:
          - api: {{method: GET, path: "/api/v1/sessions/nope%2F${{run_id}}"}}
            expect: {{status: 404, body: {{error: {{code: not_found}}}}}}
        """,
    )
    monkeypatch.setenv("SECTIONCHAT_API_URL", f"http://127.0.0.1:{api_app.api_port}")
    assert await amain([path, "--url", api_app.url]) == 0, capsys.readouterr()


async def test_a_mismatch_fails_with_the_status_and_body(api_app, capsys, tmp_path):
    path = scenario(
        tmp_path,
        """
        clients: {alice: {}}
        steps:
          - api: {method: POST, path: /api/v1/sessions, body: {user: bot, document_id: "d${run_id}", section_id: s}}
            expect: {status: 200}
        """,
    )
    assert await amain([path, *options(api_app)]) == 1
    out = capsys.readouterr().out
    assert "step 1 of 1, line 3" in out
    assert "$.status: expected 200, got 201" in out


async def test_without_expect_an_error_status_fails(api_app, capsys, tmp_path):
    path = scenario(
        tmp_path,
        """
        clients: {alice: {}}
        steps:
          - api: {method: GET, path: /api/v1/sessions/unknown}
        """,
    )
    assert await amain([path, *options(api_app)]) == 1
    assert "answered 404" in capsys.readouterr().out


async def test_api_steps_need_an_api_url(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SECTIONCHAT_API_URL", raising=False)
    path = scenario(
        tmp_path,
        """
        clients: {alice: {}}
        steps:
          - api: {method: GET, path: /api/v1/openapi.json}
        """,
    )
    assert await amain([path, "--url", "ws://127.0.0.1:1/ws"]) == 2
    assert "give --api-url" in capsys.readouterr().err


async def test_bad_api_steps_are_refused_with_their_line(capsys, tmp_path):
    path = scenario(
        tmp_path,
        """
        clients: {alice: {}}
        steps:
          - api: {method: GET, path: /api/v1/openapi.json, bdy: {}}
          - api: {method: FETCH, path: api/v1/x}
            expect: {stauts: 200}
          - api: {method: GET, path: "/api/v1/sessions/${nope}"}
          - api: {method: GET, path: /api/v1/openapi.json}
            save: {x: body.openapi}
            colour: red
          - api: /api/v1/openapi.json
        """,
    )
    assert await amain([path, "--url", "ws://127.0.0.1:1/ws", "--api-url", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: step 1: unknown key `bdy` of an api step (did you mean `body`?)" in err
    assert f"{path}:4: step 2: api.method: one of GET, POST, PATCH, PUT, DELETE, not 'FETCH'" in err
    assert f"{path}:4: step 2: api.path: a path that starts with /" in err
    assert f"{path}:4: step 2: api.expect.stauts: an api step's reply has status, body and headers" in err
    assert f"{path}:6: step 3: ${{nope}} is not saved by any earlier step" in err
    assert f"{path}:7: step 4: unknown key `colour` of an api step" in err
    assert f"{path}:10: step 5: api: give a mapping" in err
    assert "nothing was run" in err


async def test_a_client_cannot_be_called_api(capsys, tmp_path):
    path = scenario(
        tmp_path,
        """
        clients: {api: {}}
        steps:
          - api: {send: {type: ping}}
        """,
    )
    assert await amain([path, "--url", "ws://127.0.0.1:1/ws"]) == 2
    assert "`api` is a step keyword" in capsys.readouterr().err
