"""Policy files: shipped presets load; mistakes are reported with file, field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from nspawn_mcp.errors import InvalidRequest, PolicyRefused
from nspawn_mcp.policy import Policy, PolicyError, PolicySet
from nspawn_mcp.policy.loader import load_policy_file, load_policy_text, shipped_policy_dir


def test_shipped_presets_load_and_include_default() -> None:
    policies = PolicySet.load([shipped_policy_dir()])
    assert "default" in policies.names
    default = policies.get("default")
    assert default.network.mode == "none"
    assert default.limits.default.memory == 512 << 20


def test_an_empty_file_is_the_safe_default_policy() -> None:
    assert load_policy_text("", "empty.toml") == Policy()


def test_unknown_keys_are_errors_naming_file_and_field() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_text("[limits.default]\nmemroy = '1GiB'\n", "ops/typo.toml")
    message = str(caught.value)
    assert "ops/typo.toml" in message
    assert "limits.default.memroy" in message


def test_si_sizes_are_refused_with_the_allowed_units() -> None:
    with pytest.raises(PolicyError, match=r"limits\.max\.memory.*IEC units"):
        load_policy_text("[limits.max]\nmemory = '2G'\n", "p.toml")


def test_defaults_above_maxima_are_refused() -> None:
    with pytest.raises(PolicyError, match=r"limits.default.cpus is larger than limits.max.cpus"):
        load_policy_text("[limits.default]\ncpus = 4.0\n[limits.max]\ncpus = 2.0\n", "p.toml")


def test_invalid_toml_names_the_file() -> None:
    with pytest.raises(PolicyError, match=r"broken.toml: not valid TOML"):
        load_policy_text("[limits", "broken.toml")


def test_operator_directories_override_shipped_presets(tmp_path: Path) -> None:
    (tmp_path / "default.toml").write_text("[sandboxes]\nmax_live = 3\n")
    (tmp_path / "ci.toml").write_text("")
    policies = PolicySet.load([tmp_path, shipped_policy_dir()])
    assert policies.get("default").sandboxes.max_live == 3
    assert policies.names == sorted({"ci", *PolicySet.load([shipped_policy_dir()]).names})


def test_unknown_policy_names_list_the_available_ones() -> None:
    policies = PolicySet.load([shipped_policy_dir()])
    with pytest.raises(PolicyRefused, match=r"unknown policy 'nope'; available: .*default"):
        policies.get("nope")
    with pytest.raises(InvalidRequest, match=r"invalid policy name"):
        policies.get("../etc/passwd")


def test_a_policy_set_without_default_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other.toml").write_text("")
    with pytest.raises(PolicyError, match=r"no 'default' policy"):
        PolicySet.load([tmp_path])


def test_example_policies_are_valid() -> None:
    examples = Path(__file__).parents[2] / "examples" / "policies"
    for path in sorted(examples.glob("*.toml")):
        load_policy_file(path)


def test_every_shipped_preset_caps_disk_by_default() -> None:
    policies = PolicySet.load([shipped_policy_dir()])
    for name in policies.names:
        limits = policies.get(name).limits
        assert limits.default.disk is not None, name
        assert limits.max.disk is not None, name
        assert limits.default.disk <= limits.max.disk, name
