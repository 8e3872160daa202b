"""Image recipes: what an operator may write, what the errors say, and the build plan a recipe becomes."""

from __future__ import annotations

import io
import json
from pathlib import Path, PurePosixPath

import pytest

from nspawn_mcp.images.build import (
    MARKER,
    Progress,
    image_marker,
    package_in_line,
    plan_build,
)
from nspawn_mcp.images.recipe import (
    Recipe,
    RecipeError,
    RecipeSource,
    find_recipe,
    load_recipe,
    recipe_digest,
    shipped_recipe_dir,
)
from nspawn_mcp.images.templates import parse_os_release

POOL = PurePosixPath("/var/lib/machines")

LAYERED = """
description = "tools"
from = "default"
packages = ["jq", "g++"]
env = { PIP_NO_CACHE_DIR = "1" }
commands = ["echo ready > /etc/ready"]

[[files]]
path = "/etc/tools/config"
content = "x = 1\\n"
mode = 0o600
"""


def test_a_layered_recipe_reads_into_its_fields() -> None:
    recipe = load_recipe(LAYERED, "tools.toml")

    assert recipe.base == "default"
    assert recipe.suite is None
    assert recipe.packages == ("jq", "g++")
    assert recipe.files[0].path == "/etc/tools/config"
    assert recipe.files[0].mode == 0o600
    assert recipe.env == {"PIP_NO_CACHE_DIR": "1"}


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        ('description = "x"', "(top level)", "exactly one of 'suite'"),
        ('suite = "bookworm"\nfrom = "default"', "(top level)", "exactly one of 'suite'"),
        ('from = "default"\nmirror = "http://m/debian"', "(top level)", "'mirror' is for 'suite' recipes"),
        ('suite = "bookworm"\npackages = ["curl; rm -rf /"]', "packages.0", "not a Debian package name"),
        ('from = "Default"', "from", "should match pattern"),
        ('suite = "bookworm"\n[[files]]\npath = "etc/x"\ncontent = ""', "files.0.path", "absolute"),
        ('suite = "bookworm"\n[[files]]\npath = "/etc/../x"\ncontent = ""', "files.0.path", "'..'"),
        ('suite = "bookworm"\n[[files]]\npath = "/x"\ncontent = ""\nmode = 99999', "files.0.mode", "less"),
        ('suite = "bookworm"\nenv = { "A-B" = "1" }', "env", "not a variable name"),
        ('suite = "bookworm"\nshell = "bash"', "shell", "Extra inputs are not permitted"),
        ('suite = "bookworm"\ncommands = [""]', "commands.0", "at least 1 character"),
    ],
)
def test_a_wrong_recipe_is_refused_naming_the_file_and_the_field(text: str, field: str, says: str) -> None:
    with pytest.raises(RecipeError) as refused:
        load_recipe(text, "/etc/nspawn-mcp/images/bad.toml")

    message = str(refused.value)
    assert message.startswith("/etc/nspawn-mcp/images/bad.toml: invalid image recipe")
    assert f"  {field}: " in message
    assert says in message
    assert "pydantic" not in message


def test_a_recipe_that_is_not_toml_is_refused_with_its_line() -> None:
    with pytest.raises(RecipeError, match=r"^x\.toml: not valid TOML: Invalid value"):
        load_recipe("suite = ", "x.toml")


def test_the_operators_recipe_wins_over_the_shipped_one_of_the_same_name(tmp_path: Path) -> None:
    (tmp_path / "default.toml").write_text('from = "python"\ndescription = "mine"')

    found = find_recipe("default", (tmp_path,))

    assert found.path == tmp_path / "default.toml"
    assert found.recipe.description == "mine"
    assert find_recipe("node", (tmp_path,)).path == shipped_recipe_dir() / "node.toml"


def test_a_missing_recipe_says_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=rf"no recipe named 'nope' \(looked for nope.toml in {tmp_path}, "):
        find_recipe("nope", (tmp_path,))


def test_a_recipe_cannot_start_from_itself(tmp_path: Path) -> None:
    (tmp_path / "loop.toml").write_text('from = "loop"')

    with pytest.raises(RecipeError, match="from: an image cannot start from itself"):
        find_recipe("loop", (tmp_path,))


def test_the_shipped_recipes_are_valid_and_layered_on_default() -> None:
    default = find_recipe("default", ())
    assert default.recipe.suite == "bookworm"
    assert {"python3-pip", "python3-venv", "ca-certificates", "curl", "git", "procps"} <= set(
        default.recipe.packages
    )
    sources = next(f for f in default.recipe.files if f.path == "/etc/apt/sources.list")
    assert "http://" not in sources.content
    assert "deb https://deb.debian.org/debian bookworm main" in sources.content
    assert any("--uid 1000" in command and "sandbox" in command for command in default.recipe.commands)
    assert find_recipe("python", ()).recipe.base == "default"
    assert "build-essential" in find_recipe("python", ()).recipe.packages
    assert {"nodejs", "npm"} <= set(find_recipe("node", ()).recipe.packages)


def test_the_digest_changes_with_the_recipe_and_not_with_its_layout_in_the_file() -> None:
    one = load_recipe('from = "default"\npackages = ["jq"]', "a")
    same = load_recipe('packages = [ "jq" ]\n\nfrom = "default"  # a comment', "b")
    other = load_recipe('from = "default"\npackages = ["jq", "curl"]', "c")

    assert recipe_digest(one) == recipe_digest(same)
    assert recipe_digest(one) != recipe_digest(other)


def _source(text: str, name: str = "tools") -> RecipeSource:
    return RecipeSource(name, load_recipe(text, f"{name}.toml"), Path(f"/etc/nspawn-mcp/images/{name}.toml"))


def test_a_layered_build_snapshots_its_base_then_installs_writes_runs_and_cleans_in_that_order() -> None:
    steps = plan_build(_source(LAYERED), POOL, "v1")

    assert [step.title for step in steps] == [
        "start from image 'default' (a snapshot)",
        "install 2 packages: jq, g++",
        "write 1 files",
        "run: echo ready > /etc/ready",
        "clean apt's caches, empty the machine-id, record the version",
    ]
    staging = "/var/lib/machines/.#nspawn-mcp-tools.build"
    assert steps[0].commands[0].argv == (
        "btrfs",
        "subvolume",
        "snapshot",
        "/var/lib/machines/nspawn-mcp-default",
        staging,
    )
    install = steps[1].commands[0]
    assert install.argv[:5] == ("unshare", "--mount", "--propagation", "private", "--")
    assert install.argv[-2] == staging
    assert "apt-get install -y --no-install-recommends jq g++" in install.argv[-1]
    assert "policy-rc.d" in install.argv[-1]  # no services started in the chroot
    write = steps[2].commands[0]
    assert write.stdin == b"x = 1\n"
    assert write.argv[-1] == "mkdir -p /etc/tools && cat > /etc/tools/config && chmod 600 /etc/tools/config"
    assert steps[3].commands[0].argv[-1] == "echo ready > /etc/ready"
    finish = steps[-1].commands[0]
    assert finish.argv[-1].endswith(f"cat > /{MARKER}")
    assert json.loads(finish.stdin) == {"name": "tools", "version": "v1", "recipe": _source(LAYERED).digest}


def test_a_suite_build_debootstraps_into_a_new_subvolume_with_its_packages() -> None:
    source = _source('suite = "bookworm"\npackages = ["python3", "curl"]\ncommands = ["true"]', "base")

    first = plan_build(source, POOL, "v1")[0]

    assert first.title == "debootstrap bookworm with 2 packages (a minute or more)"
    staging = "/var/lib/machines/.#nspawn-mcp-base.build"
    assert first.commands[0].argv == ("btrfs", "subvolume", "create", staging)
    assert first.commands[1].argv[-4:] == (
        staging,
        "bookworm",
        "http://deb.debian.org/debian",
        "--include=python3,curl",
    )
    assert 'debootstrap --variant=minbase "$@" "$suite" "$target" "$mirror"' in first.commands[1].argv[-6]


def test_a_command_with_quotes_reaches_the_chroot_shell_unchanged() -> None:
    command = "printf '%s\\n' \"$HOME\" | tee /root/where && test -d /proc/self"
    source = _source(f'from = "default"\ncommands = [{json.dumps(command)}]')

    step = plan_build(source, POOL, "v1")[1]

    assert step.commands[0].argv[-1] == command
    assert step.title.startswith("run: printf")


def test_long_commands_are_shortened_in_the_step_title_only() -> None:
    command = "echo " + "x" * 200
    step = plan_build(_source(f'from = "default"\ncommands = ["{command}"]'), POOL, "v1")[1]

    assert len(step.title) <= 65
    assert step.title.endswith("…")
    assert step.commands[0].argv[-1] == command


@pytest.mark.parametrize(
    ("line", "package"),
    [
        ("I: Retrieving libc6 2.36-9+deb12u9\n", "libc6"),
        ("I: Configuring python3.11...\n", "python3.11"),
        ("I: Installing required packages...\n", None),
        ("I: Unpacking required packages...\n", None),
        ("I: Configuring the base system...\n", None),
        ("I: Extracting base-files...\n", "base-files"),
        ("Unpacking build-essential (12.9) ...\n", "build-essential"),
        ("Setting up libssl-dev:amd64 (3.0.15-1~deb12u1) ...\n", "libssl-dev"),
        ("Get:1 https://deb.debian.org/debian bookworm InRelease\n", None),
        ("I: Checking Release signature\n", None),
    ],
)
def test_progress_names_the_package_a_line_of_output_is_about(line: str, package: str | None) -> None:
    assert package_in_line(line) == package


def test_progress_off_a_terminal_shows_steps_and_at_most_one_package_line_per_interval() -> None:
    out = io.StringIO()
    progress = Progress(out, quiet_interval=3600)

    progress.step(1, 2, "debootstrap bookworm")
    progress.package("libc6")
    progress.package("bash")
    progress.done("installed")

    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/2] debootstrap bookworm (0:00)"
    assert lines[1] == "      libc6 (0:00)"
    assert lines[2] == "installed (0:00)"
    assert "\r" not in out.getvalue()


def test_os_release_is_read_with_quotes_removed() -> None:
    text = (
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n# a comment\nVERSION_ID='12'\nbad line\n"
    )

    assert parse_os_release(text) == {
        "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)",
        "ID": "debian",
        "VERSION_ID": "12",
    }


def test_the_marker_records_name_version_and_recipe() -> None:
    recipe = Recipe.model_validate({"from": "default"})

    marker = json.loads(image_marker("tools", "v7", recipe_digest(recipe)))

    assert marker == {"name": "tools", "version": "v7", "recipe": recipe_digest(recipe)}
