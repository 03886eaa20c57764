"""The cold-start bench's Ray Serve column without Ray: how it reads the peer's answer,
and that no failure of the peer (or its absence) takes the bench down."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from smss.bench import coldstart

MODELS = ["cnn", "cnn_large"]


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_fields_from_the_peers_json_line() -> None:
    line = json.dumps(
        {
            "ray_version": "9.9",
            "config": "min_replicas=0",
            "models": {
                "cnn": {"cold_ms": 900.0, "warm_ms": 5.0, "samples_ms": [900.0], "tries": 1},
                "cnn_large": {"cold_ms": None, "error": "RuntimeError: boom"},
            },
        }
    )
    # Ray writes its own lines to stdout too: the result is the last JSON object.
    fields = coldstart.peer_fields(MODELS, _script(f"print('(raylet) noise'); print({line!r})"), 30)
    assert fields["cnn"] == {
        "ray_serve_cold_ms": 900.0,
        "ray_serve_warm_ms": 5.0,
        "ray_serve_samples_ms": [900.0],
        "ray_serve_config": "Ray 9.9: min_replicas=0",
        "ray_serve_note": None,
    }
    assert fields["cnn_large"]["ray_serve_cold_ms"] is None
    assert fields["cnn_large"]["ray_serve_note"] == "RuntimeError: boom"


@pytest.mark.parametrize(
    ("code", "note"),
    [
        ("import sys; print('not json'); sys.exit(3)", "exit status 3, no JSON result"),
        ("import json; print(json.dumps({'error': 'ray.init failed'}))", "Ray Serve did not run"),
        ("import time; time.sleep(60)", "no result within"),
    ],
)
def test_a_failing_peer_gives_null_and_a_note(code: str, note: str) -> None:
    fields = coldstart.peer_fields(MODELS, _script(code), timeout=1.0)
    for name in MODELS:
        assert fields[name]["ray_serve_cold_ms"] is None
        assert note in fields[name]["ray_serve_note"]


def test_without_ray_the_note_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    fields = coldstart.ray_serve({name: None for name in MODELS})
    assert fields["cnn"] == {
        "ray_serve_cold_ms": None,
        "ray_serve_note": "ray[serve] is not installed (pip install 'smss[bench]'); not measured",
    }
