"""How the conformance suite's results are held against tests/e2e/conformance-expected.json."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e import conformance
from tests.e2e.conformance import NEEDS_REASON, Outcome

PASS = Outcome("pass", "")


def expected(**results: str) -> dict[str, object]:
    return {
        "scenarios": {
            name: {"result": result, "reason": "why", "message": ""} for name, result in results.items()
        }
    }


def test_a_scenario_name_is_the_suites_directory_without_prefix_and_time() -> None:
    assert conformance.scenario_name("server-tools-list-2026-11-24T18-56-39-720Z") == "tools-list"
    assert (
        conformance.scenario_name("server-server-initialize-2026-11-24T18-56-39-567Z") == "server-initialize"
    )


def test_a_scenario_passes_only_when_no_check_failed() -> None:
    assert conformance.outcome([{"status": "SUCCESS"}, {"status": "WARNING"}]) == PASS
    failed = conformance.outcome([{"status": "SUCCESS"}, {"status": "FAILURE", "errorMessage": "No audio"}])
    assert failed == Outcome("fail", "No audio")
    assert conformance.outcome([]).result == "fail"  # a scenario that checked nothing proved nothing


def test_results_are_read_from_the_suites_output_directory(tmp_path: Path) -> None:
    for name, status in (("ping", "SUCCESS"), ("logging-set-level", "FAILURE")):
        directory = tmp_path / f"server-{name}-2026-11-24T18-56-39-615Z"
        directory.mkdir()
        (directory / "checks.json").write_text(json.dumps([{"status": status, "errorMessage": "no"}]))
    assert conformance.read_results(tmp_path) == {"ping": PASS, "logging-set-level": Outcome("fail", "no")}


def test_the_same_results_are_no_difference() -> None:
    assert (
        conformance.differences(expected(ping="pass", x="fail"), {"ping": PASS, "x": Outcome("fail", "m")})
        == []
    )


def test_a_new_failure_an_unexpected_pass_and_added_or_dropped_scenarios_are_differences() -> None:
    found = conformance.differences(
        expected(ping="pass", logging="fail", gone="pass"),
        {"ping": Outcome("fail", "timed out"), "logging": PASS, "new": PASS},
    )
    assert found == [
        "gone: listed in the expected file but the suite no longer runs it",
        "logging: expected fail, now pass",
        "new: a new scenario (pass), not in the expected file",
        "ping: expected pass, now fail: timed out",
    ]


def test_a_result_without_its_reason_is_a_difference() -> None:
    file = expected(ping="fail")
    file["scenarios"]["ping"]["reason"] = NEEDS_REASON  # type: ignore[index]
    assert conformance.differences(file, {"ping": Outcome("fail", "m")}) == [
        f"ping: its reason is still {NEEDS_REASON}: write why it fails"
    ]


def test_regenerating_keeps_reasons_of_unchanged_results_and_asks_for_the_others() -> None:
    previous = expected(ping="pass", logging="fail", prompts="pass")
    actual = {
        "ping": PASS,  # unchanged: its reason stays
        "logging": PASS,  # now passes
        "prompts": Outcome("fail", "boom"),  # a new failure, not a fixture: someone must explain it
        "tools-call-image": Outcome("fail", "No image content found"),  # a fixture scenario
    }
    made = conformance.regenerated(previous, actual, "suite 1.0")
    scenarios = made["scenarios"]
    assert scenarios["ping"]["reason"] == "why"
    assert scenarios["logging"] == {"result": "pass", "reason": "passes", "message": ""}
    assert scenarios["prompts"] == {"result": "fail", "reason": NEEDS_REASON, "message": "boom"}
    assert scenarios["tools-call-image"]["reason"] == conformance.STANDING_REASONS["tools-call-image"]
    assert made["summary"] == "2 passed, 2 failed"
    assert conformance.differences(made, actual) == [
        "prompts: its reason is still EXPLAIN: write why it fails"
    ]


def test_the_checked_in_file_explains_every_result() -> None:
    listed = conformance.load_expected()["scenarios"]
    assert listed
    assert all(entry["result"] in ("pass", "fail") and entry["reason"] for entry in listed.values())
    assert not [name for name, entry in listed.items() if entry["reason"] == NEEDS_REASON]
