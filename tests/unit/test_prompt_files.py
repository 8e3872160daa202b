"""Prompt files: the front matter names the arguments; the shipped prompts all load."""

from __future__ import annotations

import importlib.resources

import pytest

from nspawn_mcp.features.prompts import PromptArgumentError, PromptFileError, load_prompts, parse_prompt

GOOD = """+++
description = "Say hello"

[[arguments]]
name = "who"
description = "whom to greet"
default = "world"
+++
Hello, {{who}}!
"""


def test_a_prompt_file_names_its_arguments_and_fills_them_in() -> None:
    prompt = parse_prompt("say-hello.md", GOOD)
    assert prompt.name == "say_hello"
    assert [(a.name, a.required) for a in prompt.arguments] == [("who", False)]
    assert prompt.render({}) == "Hello, world!\n"
    assert prompt.render({"who": "sandbox"}) == "Hello, sandbox!\n"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Hello\n", "must start with a +++ TOML front matter +++ block"),
        (GOOD.replace("{{who}}", "{{whom}}"), "{{whom}} is not one of its arguments"),
        (GOOD.replace('description = "Say hello"', 'summary = "x"'), "unknown front matter key 'summary'"),
        (GOOD.replace('name = "who"', 'name = "Who"'), "an argument needs a name"),
        (GOOD.replace("default = ", "default = 1 #"), "the default of 'who' must be a string"),
        (GOOD.replace('description = "Say', 'description = "Say\n'), "front matter"),
    ],
)
def test_a_malformed_prompt_file_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(PromptFileError, match=r"say-hello\.md") as refused:
        parse_prompt("say-hello.md", text)
    assert says in str(refused.value)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"whom": "x"}, "prompt 'say_hello' has no argument 'whom'; its arguments: who"),
        ({"who": "a\nb"}, "must be one line of at most 512 printable characters"),
        ({"who": "x" * 513}, "must be one line of at most 512 printable characters"),
    ],
)
def test_arguments_that_do_not_fit_are_refused(given: dict[str, str], says: str) -> None:
    with pytest.raises(PromptArgumentError) as refused:
        parse_prompt("say-hello.md", GOOD).render(given)
    assert says in str(refused.value)


def test_the_shipped_prompts_load() -> None:
    prompts = load_prompts(importlib.resources.files("nspawn_mcp") / "data" / "prompts")
    assert [p.name for p in prompts] == ["review_untrusted_code", "run_repository_tests", "sandbox_workflow"]
