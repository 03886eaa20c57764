"""Property: every request decoder either decodes its input or raises our typed error
that maps to a 4xx, never another exception. The example count comes from the
hypothesis profile (``HYPOTHESIS_PROFILE``: ``ci`` by default, ``long`` for more);
``scripts/fuzz`` runs the same targets for longer."""

from __future__ import annotations

import pytest
from hypothesis import given
from inputs import HOSTILE, SEEDS, STRATEGIES
from targets import TARGETS


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_decode(name: str) -> None:
    """The seeds are valid inputs, so the fuzzer starts from inputs that reach deep."""
    for seed in SEEDS[name]:
        assert TARGETS[name](seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_hostile_inputs_are_refused_cleanly(name: str) -> None:
    for data in HOSTILE[name]:
        TARGETS[name](data)  # decodes or refuses; raises only on a crash


def _property(name: str):  # type: ignore[no-untyped-def]
    @given(STRATEGIES[name])
    def test(data: bytes) -> None:
        TARGETS[name](data)

    test.__name__ = f"test_{name}_decodes_or_refuses"
    return test


test_infer_json_decodes_or_refuses = _property("infer_json")
test_infer_binary_decodes_or_refuses = _property("infer_binary")
test_tensor_list_decodes_or_refuses = _property("tensor_list")
test_deploy_body_decodes_or_refuses = _property("deploy_body")
test_run_body_decodes_or_refuses = _property("run_body")
test_replay_body_decodes_or_refuses = _property("replay_body")
test_workflow_json_decodes_or_refuses = _property("workflow_json")
test_workflow_yaml_decodes_or_refuses = _property("workflow_yaml")
test_safetensors_decodes_or_refuses = _property("safetensors")
