"""The MCP conformance suite's results, and the checked-in file that says which of them to expect.

``tests/e2e/conformance-expected.json`` lists every scenario of the suite's active set with ``pass`` or
``fail``, the suite's own message for a failure, and the reason we expect that result. The end-to-end
test (``test_conformance.py``) runs the suite against the daemon's HTTP listener and fails on any
difference: a new failure, an expected failure that now passes, a scenario added or gone. Regenerate the
file with ``make conformance-expected`` after a change that moves a result: it keeps the reasons of
results that did not change, gives fixture-only scenarios their standing reason, and marks anything else
``EXPLAIN`` for a person to write its reason (the test refuses a file that still has one).

Pure functions of data; running the suite is ``test_conformance.py``'s business.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

EXPECTED_FILE = Path(__file__).resolve().parent / "conformance-expected.json"
REGENERATE = "make conformance-expected"
NEEDS_REASON = "EXPLAIN"
Result = Literal["pass", "fail"]

FIXTURE = "calls the reference server's fixture {what}, which this server does not have"
STANDING_REASONS: dict[str, str] = {
    "tools-call-image": FIXTURE.format(what="tool test_image_content"),
    "tools-call-audio": FIXTURE.format(what="tool test_audio_content"),
    "tools-call-embedded-resource": FIXTURE.format(what="tool test_embedded_resource"),
    "tools-call-mixed-content": FIXTURE.format(what="tool test_multiple_content_types"),
    "tools-call-with-logging": FIXTURE.format(what="tool test_tool_with_logging"),
    "tools-call-with-progress": FIXTURE.format(what="tool test_tool_with_progress")
    + " (exec_in_sandbox sends progress, tested in tests/e2e)",
    "tools-call-sampling": FIXTURE.format(what="tool test_sampling")
    + "; the server never asks the client to sample",
    "tools-call-elicitation": FIXTURE.format(what="tool test_elicitation")
    + "; the server never elicits input",
    "elicitation-sep1034-defaults": FIXTURE.format(what="tool test_elicitation_sep1034_defaults")
    + "; the server never elicits input",
    "elicitation-sep1330-enums": FIXTURE.format(what="tool test_elicitation_sep1330_enums")
    + "; the server never elicits input",
    "resources-read-text": FIXTURE.format(what="resource test://static-text"),
    "resources-read-binary": FIXTURE.format(what="resource test://static-binary"),
    "resources-templates-read": FIXTURE.format(what="resource template test://template/{id}/data"),
    "resources-subscribe": "the server does not offer resource subscriptions (no `subscribe` capability), "
    "and the scenario subscribes to the fixture test://static-text",
    "resources-unsubscribe": "the server does not offer resource subscriptions (no `subscribe` capability), "
    "and the scenario unsubscribes from the fixture test://static-text",
    "prompts-get-simple": FIXTURE.format(what="prompt test_simple_prompt"),
    "prompts-get-with-args": FIXTURE.format(what="prompt test_prompt_with_arguments"),
    "prompts-get-embedded-resource": FIXTURE.format(what="prompt test_prompt_with_embedded_resource"),
    "prompts-get-with-image": FIXTURE.format(what="prompt test_prompt_with_image"),
}
"""Why a scenario fails for good: it needs the reference server's fixtures (or a feature we do not offer)."""


@dataclass(frozen=True)
class Outcome:
    result: Result
    message: str
    """The suite's error messages for the failed checks, joined; empty when it passed."""


def scenario_name(result_directory: str) -> str:
    """``server-tools-list-2026-11-24T18-56-39-720Z`` -> ``tools-list`` (the suite's output directory)."""
    name = re.sub(r"-\d{4}-\d\d-\d\dT[\d-]+Z$", "", result_directory)
    return name.removeprefix("server-")


def outcome(checks: list[dict[str, Any]]) -> Outcome:
    """A scenario passes when none of its checks failed (the suite's SUCCESS, WARNING, INFO, SKIPPED)."""
    failed = [check for check in checks if check.get("status") in ("FAILURE", "ERROR")]
    if not failed and checks:
        return Outcome("pass", "")
    messages = [str(check.get("errorMessage") or check.get("id") or "failed") for check in failed]
    return Outcome("fail", "; ".join(messages) or "the scenario ran no check")


def read_results(output_directory: Path) -> dict[str, Outcome]:
    """Each scenario's outcome from the suite's ``-o`` directory (``SCENARIO-TIME/checks.json``)."""
    outcomes = {}
    for checks_file in sorted(output_directory.glob("*/checks.json")):
        outcomes[scenario_name(checks_file.parent.name)] = outcome(json.loads(checks_file.read_text()))
    return outcomes


def load_expected(path: Path = EXPECTED_FILE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def differences(expected: Mapping[str, Any], actual: Mapping[str, Outcome]) -> list[str]:
    """One sentence per scenario whose result differs from the file; empty when all is as expected."""
    listed: Mapping[str, Mapping[str, str]] = expected["scenarios"]
    found = []
    for name in sorted(set(listed) | set(actual)):
        if name not in actual:
            found.append(f"{name}: listed in the expected file but the suite no longer runs it")
        elif name not in listed:
            found.append(f"{name}: a new scenario ({actual[name].result}), not in the expected file")
        elif listed[name]["result"] != actual[name].result:
            was, now = listed[name]["result"], actual[name]
            detail = f": {now.message}" if now.message else ""
            found.append(f"{name}: expected {was}, now {now.result}{detail}")
    found += [
        f"{name}: its reason is still {NEEDS_REASON}: write why it {entry['result']}s"
        for name, entry in sorted(listed.items())
        if entry.get("reason") == NEEDS_REASON
    ]
    return found


def regenerated(
    previous: Mapping[str, Any] | None, actual: Mapping[str, Outcome], suite: str
) -> dict[str, Any]:
    """The expected file for ``actual``, keeping the reasons of results that did not change."""
    old: Mapping[str, Mapping[str, str]] = previous["scenarios"] if previous else {}
    scenarios = {}
    for name, now in sorted(actual.items()):
        before = old.get(name)
        if before is not None and before.get("result") == now.result and before.get("reason"):
            reason = before["reason"]
        elif now.result == "fail" and name in STANDING_REASONS:
            reason = STANDING_REASONS[name]
        elif now.result == "pass":
            reason = "passes"
        else:
            reason = NEEDS_REASON
        scenarios[name] = {"result": now.result, "reason": reason, "message": now.message}
    passed = sum(1 for entry in scenarios.values() if entry["result"] == "pass")
    return {
        "about": (
            f"{suite}, server mode, against `nspawn-mcp daemon` over streamable HTTP on loopback with a "
            f"bearer token. Regenerate with `{REGENERATE}`; tests/e2e/conformance.py says how."
        ),
        "summary": f"{passed} passed, {len(scenarios) - passed} failed",
        "scenarios": scenarios,
    }
