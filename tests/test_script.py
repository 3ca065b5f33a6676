"""The scripted-socket harness (`sectionchat script`), against real servers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.pytest_plugin import SectionchatServer
from client.script import amain, main, match

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SectionchatServer]:
    """One server for the tests that do not need a fresh one (scenarios use ${run_id}, so they never meet)."""
    with SectionchatServer(tmp_path_factory.mktemp("shared") / "data") as server:
        yield server


def scenario(tmp_path: Path, text: str, name: str = "scenario.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return str(path)


def test_the_examples_are_there():
    assert {path.stem for path in EXAMPLES} >= {"chat", "reconnect_recover", "errors", "idempotency"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
@pytest.mark.sectionchat_server("--rate-limit", "20", "--sessions-per-minute", "60")  # the server's defaults
def test_each_example_passes_against_a_fresh_server(example: Path, sectionchat_server, capsys):
    code = main([str(example), "--url", sectionchat_server.url])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith(f"PASS {example}")
    assert len(out.splitlines()) == 1


async def test_amain_runs_inside_an_event_loop_against_the_in_process_app(app, capsys):
    assert await amain([str(ROOT / "examples" / "errors.yaml"), "--url", app.url]) == 0
    assert capsys.readouterr().out.startswith("PASS")


def test_examples_through_the_command_line_and_again(shared_server: SectionchatServer):
    """`python -m server script` as CI runs it; a second run against the same server passes too."""
    command = [
        sys.executable,
        "-m",
        "server",
        "script",
        *map(str, EXAMPLES),
        "--url",
        shared_server.url.removesuffix("/ws"),
    ]
    for _ in range(2):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=50)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{len(EXAMPLES)} of {len(EXAMPLES)} scenarios passed" in done.stdout


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--record" in capsys.readouterr().out
    done = subprocess.run(
        [sys.executable, "-m", "server", "script", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0 and "SCENARIO" in done.stdout


TWO_USERS = """
    name: broken on purpose
    clients:
      alice: {name: alice}
      bob: {name: bob}
    steps:
      - bob: {send: {type: subscribe, document_id: "d-${run_id}", section_id: s}}
        expect: {type: subscribed}
      - alice: {send: {type: create_session, document_id: "d-${run_id}", section_id: s, title: Hi}}
        expect: {type: session_created, session: {title: Hello, created_by: alice, closed: false}}
"""


def test_a_wrong_value_fails_with_a_diff_naming_the_path(tmp_path, shared_server, capsys):
    code = main([scenario(tmp_path, TWO_USERS), "--url", shared_server.url])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "step 2 of 2, line 8" in out
    # The step as written, the frame sent, the expected shape, the actual frame, the differing path.
    assert '8 |   - alice: {send: {type: create_session, document_id: "d-${run_id}"' in out
    assert "alice sent:" in out and "expected a reply matching:" in out and "got:" in out
    assert '"title": "Hi"' in out  # the actual frame, pretty-printed
    differences = out.split("differences:")[1].strip().splitlines()
    assert differences[0].strip() == '$.session.title: expected "Hello", got "Hi"'
    assert len([line for line in differences if line.strip().startswith("$.")]) == 1


def test_a_timeout_says_what_was_awaited_and_what_arrived(tmp_path, shared_server, capsys):
    path = scenario(
        tmp_path,
        TWO_USERS.replace("title: Hello", "title: Hi")
        + "      - bob: {expect_event: {type: message, message: {text: never}}, timeout: 0.3}\n",
    )
    code = main([path, "--url", shared_server.url])
    out = capsys.readouterr().out
    assert code == 1
    assert "step 3 of 3" in out
    assert "timed out after 0.3 s waiting for bob to receive an event matching:" in out
    assert '"text": "never"' in out
    # What did arrive: the session_created event bob got, not taken by any step.
    assert "received these frames that no step has taken yet" in out
    assert '{"type": "session_created", "session": {' in out


def test_a_reply_timeout_and_a_server_close_are_reported(tmp_path, shared_server, capsys):
    path = scenario(
        tmp_path,
        """
        clients:
          alice: {name: alice}
        steps:
          - alice: {send: {type: typing, session_id: nope, id: t1}, expect: {type: error, code: not_found}}
          - alice: {send: {type: ping, id: null}, expect_no_event: {type: pong}, for: 0.05}
        """,
    )
    assert main([path, "--url", shared_server.url]) == 1
    out = capsys.readouterr().out
    assert "alice got an event it should not have within 0.05 s" in out and '"type": "pong"' in out

    path = scenario(
        tmp_path,
        """
        clients:
          alice: {name: alice}
        steps:
          - alice: {send: {type: ping, pad: {$repeat: [x, 70000]}}, expect: {type: pong}}
        """,
    )
    assert main([path, "--url", shared_server.url]) == 1
    out = capsys.readouterr().out
    assert "alice's connection was closed by the server (code 1009" in out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("clients: {a: {}}\nsteps:\n  - a: {send: {type: ping}\n", ":4:1: not valid YAML"),
        (
            "clients: {a: {}}\nsteps:\n  - a: {send: {type: ping}, expct: {type: pong}}\n",
            ":3: step 1: unknown key `expct` (did you mean `expect`?)",
        ),
        ("clients: {a: {}}\nsteps:\n  - b: {send: {type: ping}}\n", ":3: step 1: names no client: unknown b"),
        (
            "clients: {a: {}}\nsteps:\n  - sleep: 0\n  - a: {send: {type: get_session, session_id: '${sid}'}}\n",
            ":4: step 2: ${sid} is not saved by any earlier step",
        ),
        (
            "clients: {a: {}}\nsteps:\n  - a: {expect_event: {seq: {$gtt: 1}}}\n",
            ":3: step 1: expect_event.seq: unknown matcher $gtt (did you mean $gt?)",
        ),
        ("clients: {a: {nmae: x}}\nsteps:\n  - a: disconnect\n", ":1: clients.a: object contains unknown field nmae"),
        (
            "clients: {a: {}}\nsteps:\n  - a: disconnect\n  - a: {send: {type: ping}}\n",
            ":4: step 2: a is not connected here",
        ),
        ("clients: {a: {}}\ntimeout: soon\nsteps: []\n", ":2: timeout: expected float | null, got str"),
        ("just a string\n", ": a scenario is a mapping"),
    ],
    ids=[
        "yaml",
        "unknown-key",
        "unknown-client",
        "undefined-variable",
        "unknown-matcher",
        "client-field",
        "not-connected",
        "type",
        "not-a-mapping",
    ],
)
def test_a_bad_file_exits_2_with_its_location_and_runs_nothing(tmp_path, capsys, text, problem):
    path = scenario(tmp_path, text)
    # Nothing listens on port 1: had the harness tried to connect, the exit code would be 1.
    assert main([path, "--url", "ws://127.0.0.1:1/ws"]) == 2
    err = capsys.readouterr().err
    assert path + problem in err, err
    assert "nothing was run" in err


def test_a_missing_file_and_bad_options_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main([str(EXAMPLES[0]), "--url", "http://"]) == 2
    assert main([str(EXAMPLES[0]), "--timeout", "0"]) == 2
    assert main([]) == 2


def test_an_unreachable_server_fails_with_exit_1(capsys):
    assert main([str(EXAMPLES[0]), "--url", "ws://127.0.0.1:1/ws", "--timeout", "2"]) == 1
    assert "could not connect to ws://127.0.0.1:1/ws?name=" in capsys.readouterr().out


def test_record_writes_a_parseable_transcript(tmp_path, shared_server, capsys):
    record = tmp_path / "transcript.jsonl"
    example = ROOT / "examples" / "chat.yaml"
    assert main([str(example), "--url", shared_server.url, "--record", str(record)]) == 0
    entries = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert entries and all({"time", "client", "direction", "frame"} <= entry.keys() for entry in entries)
    times = [entry["time"] for entry in entries]
    assert times == sorted(times)
    assert {entry["client"] for entry in entries} == {"alice", "bob"}
    assert {entry["direction"] for entry in entries} == {"open", "send", "recv", "close"}
    sent = [entry["frame"] for entry in entries if entry["direction"] == "send"]
    received = [entry["frame"] for entry in entries if entry["direction"] == "recv"]
    assert [frame["type"] for frame in received if frame["type"] == "welcome"] == ["welcome", "welcome"]
    # Every request got an id, and every reply names one of them.
    ids = {frame["id"] for frame in sent if "id" in frame}
    assert {frame["reply_to"] for frame in received if "reply_to" in frame} <= ids
    assert any(frame["type"] == "message" and frame["message"]["text"] == "Yes." for frame in received)
    # The run_id-suffixed document is the same in what was sent and what came back.
    documents = {frame["document_id"] for frame in sent if "document_id" in frame}
    assert len(documents) == 1 and next(iter(documents)).startswith("spec-")


def test_variables_matchers_and_commands_work_together(tmp_path, shared_server, capsys):
    """A tour of the less common parts: --var, expect_welcome, anonymous clients, msgpack, late connect, $ matchers."""
    path = scenario(
        tmp_path,
        """
        clients:
          packed: {name: packed, subprotocol: sectionchat.v1.msgpack}
          anon: {}
          late: {name: late, connect: false}
        timeout: 3
        steps:
          - anon: {expect_welcome: {user: {$regex: "^anon-[0-9a-f]{6}$"}, limits: {max_text_chars: {$gte: 1}}}}
            save: {who: user}
          - packed: {send: {type: subscribe, document_id: "${doc}-${run_id}", section_id: s, id: sub-1}}
            expect: {type: subscribed, reply_to: sub-1, presence: [packed], epoch: {$type: [string, "null"]}}
          - anon: {send: {type: subscribe, document_id: "${doc}-${run_id}", section_id: s}}
            expect: {type: subscribed, presence: {$contains: ["${who}"], $len: 2}}
          - packed: {expect_event: {type: presence, joined: ["${who}"], left: {$len: 0}}}
          - late: connect
          - late: {send: {type: ping, id: null}}
          - late: {expect_event: {type: pong, reply_to: $absent}}
          - late: {send_raw: '{"type": "ping", "id": "raw-1"}', expect: {type: pong, reply_to: raw-1}}
          - late: {send: {type: list_sessions, document_id: "${doc}-${run_id}"}, expect: {sessions: []}}
          - late: disconnect
          - packed: {expect_no_event: {type: presence}, for: 0.3}
        """,
    )
    code = main([path, "--url", shared_server.url, "--var", "doc=tour"])
    assert code == 0, capsys.readouterr().out


def test_match_reports_every_differing_path():
    frame = {"type": "message", "offset": 3, "message": {"seq": 1, "text": "hi", "tags": ["a", "b"], "odd key": True}}
    assert match({"type": "message", "message": {"seq": 1}}, frame) == []
    assert match({"offset": "$any", "absent": "$absent", "message": {"text": {"$regex": "^h"}}}, frame) == []
    assert match({"message": {"seq": True}}, frame) == ["$.message.seq: expected true, got 1"]
    assert match({"offset": 3.0, "message": {"seq": {"$gt": 0, "$lte": 1}}}, frame) == []
    assert match(
        {"type": "msg", "offset": "$absent", "missing": 1, "message": {"tags": ["a"], "odd key": 1}}, frame
    ) == [
        '$.type: expected "msg", got "message"',
        "$.offset: expected no such field, got 3",
        "$.missing: missing, expected 1",
        "$.message.tags: expected 1 items, got 2",
        '$.message["odd key"]: expected 1, got true',
    ]
    assert match({"message": {"tags": {"$contains": ["b"], "$len": 2}, "text": {"$type": "string"}}}, frame) == []
    assert match({"message": {"tags": {"$contains": ["c"]}}}, frame) == [
        '$.message.tags: expected an item matching "c", got ["a", "b"]'
    ]
    assert match({"message": {"text": {"$type": ["integer", "null"]}}}, frame) == [
        '$.message.text: expected type integer or null, got string "hi"'
    ]
