"""Names of what the server makes on the host: built and parsed in one module, and only ours parse."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nspawn_mcp.errors import InvalidRequest
from nspawn_mcp.naming import (
    INTERFACE_PATTERN,
    SANDBOX_ID,
    UNIT_PATTERNS,
    host_interface,
    machine_name,
    new_sandbox_id,
    nft_object,
    parse_sandbox_id,
    sandbox_of_interface,
    sandbox_of_machine,
    sandbox_of_unit,
    service_unit,
    slice_unit,
    template_image,
    template_of_image,
)

sandbox_ids = st.from_regex(r"sbx-[0-9a-f]{8}", fullmatch=True)


@given(sandbox_ids)
def test_every_name_of_a_sandbox_parses_back_to_its_id(sandbox_id: str) -> None:
    assert sandbox_of_machine(machine_name(sandbox_id)) == sandbox_id
    assert sandbox_of_unit(service_unit(sandbox_id)) == sandbox_id
    assert sandbox_of_unit(slice_unit(sandbox_id)) == sandbox_id
    assert sandbox_of_interface(host_interface(sandbox_id)) == sandbox_id


@given(sandbox_ids)
def test_the_listing_patterns_match_every_name_the_parsers_claim(sandbox_id: str) -> None:
    units = (service_unit(sandbox_id), slice_unit(sandbox_id))
    assert all(any(fnmatch.fnmatchcase(unit, pattern) for pattern in UNIT_PATTERNS) for unit in units)
    assert fnmatch.fnmatchcase(host_interface(sandbox_id), INTERFACE_PATTERN)


@given(sandbox_ids)
def test_names_fit_the_kernels_and_systemds_limits(sandbox_id: str) -> None:
    assert len(host_interface(sandbox_id)) <= 15  # IFNAMSIZ - 1
    assert slice_unit(sandbox_id).count("-") == 1  # one level below nspawnmcp.slice
    assert len({nft_object(kind, sandbox_id) for kind in ("egress", "sni", "input", "resolved")}) == 4


@given(st.text(min_size=1, max_size=40).filter(lambda name: "/" not in name))
def test_template_images_parse_back_to_the_image_they_stand_for(image: str) -> None:
    assert template_of_image(template_image(image)) == image


def test_new_ids_are_valid_and_distinct() -> None:
    ids = {new_sandbox_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(parse_sandbox_id(sandbox_id) == sandbox_id for sandbox_id in ids)


@pytest.mark.parametrize(
    "name",
    [
        "nspawn-mcp-default",  # the template image, not a sandbox
        "nspawn-mcp.service",
        "nspawnmcp.slice",  # the parent slice
        "machine.slice",
        "systemd-nspawn@sbx-0123abcd.service",  # someone else's unit for a machine of that name
        "nspawn-mcp-sbx-0123abcd.scope",
        "nspawn-mcp-sbx-0123ABCD.service",  # malformed ids
        "nspawn-mcp-sbx-0123abc.service",
        "nspawn-mcp-sbx-0123abcde.service",
        "nspawnmcp-0123abcd0.slice",
        "nspawnmcp-sbx-0123abcd.slice",
        "nspawnmcp-0123abcd.slice.d",
        "nspawn-mcp-sbx-0123abcd.service\n",
        "sbx-0123abcd",  # a machine name is not a unit
        "",
    ],
)
def test_foreign_and_malformed_unit_names_are_not_ours(name: str) -> None:
    assert sandbox_of_unit(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "nspawn-mcp-default",
        "sbx-0123ABCD",
        "sbx-0123abc",
        "sbx-0123abcd0",
        "xsbx-0123abcd",
        "sbx-0123abcd\n",
        "",
    ],
)
def test_foreign_and_malformed_machine_and_image_names_are_not_sandboxes(name: str) -> None:
    assert sandbox_of_machine(name) is None


@pytest.mark.parametrize(
    "name", ["ve-sbx-0123abc", "ve-sbx-0123ABCD", "vb-sbx-0123abcd", "sbx-0123abcd", "eth0"]
)
def test_foreign_and_malformed_interfaces_are_not_sandboxes(name: str) -> None:
    assert sandbox_of_interface(name) is None


@pytest.mark.parametrize("name", ["sbx-0123abcd", "nspawn-mcp-", "default", "nspawn-mcp"])
def test_sandbox_images_and_other_images_are_not_templates(name: str) -> None:
    assert template_of_image(name) is None


@given(st.text(max_size=60))
def test_anything_that_parses_as_ours_is_a_valid_id(name: str) -> None:
    for parsed in (sandbox_of_unit(name), sandbox_of_machine(name), sandbox_of_interface(name)):
        assert parsed is None or SANDBOX_ID.fullmatch(parsed)


@pytest.mark.parametrize("value", ["../etc", "sbx-0123abcd\n", "sbx-0123abcd0", " sbx-0123abcd"])
def test_an_invalid_id_from_an_agent_is_refused_saying_what_ids_look_like(value: str) -> None:
    with pytest.raises(InvalidRequest, match=r"ids look like 'sbx-1a2b3c4d'"):
        parse_sandbox_id(value)
