from __future__ import annotations

from pathlib import Path

import pytest

from nspawn_mcp.backend.cgroups import oom_kill_count
from nspawn_mcp.provision import filesystem_type

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /var/lib/machines rw,relatime shared:9 - btrfs /dev/loop0 rw,space_cache=v2
31 22 0:27 / /var/lib/machines-old rw - xfs /dev/vdb rw
32 22 0:28 / /srv/my\\040dir rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/var/lib/machines", "btrfs"),
        ("/var/lib/machines/sbx-1", "btrfs"),
        ("/var/lib/machines-old", "xfs"),
        ("/var/lib", "ext4"),
        ("/srv/my dir/x", "tmpfs"),
    ],
)
def test_the_filesystem_of_a_path_is_its_longest_mount_prefix(path: str, expected: str) -> None:
    assert filesystem_type(path, MOUNTINFO) == expected


def test_oom_kills_are_summed_over_a_v1_slice_and_read_whole_from_v2(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    service = v1 / "memory/nspawnmcp.slice/nspawnmcp-0000abcd.slice/nspawn-mcp-sbx-0000abcd.service"
    service.mkdir(parents=True)
    (service.parent / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (service / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert oom_kill_count("sbx-0000abcd", v1) == 2
    assert oom_kill_count("sbx-ffffffff", v1) is None

    v2 = tmp_path / "v2"
    slice_dir = v2 / "nspawnmcp.slice/nspawnmcp-0000abcd.slice"
    slice_dir.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory pids\n")
    (slice_dir / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert oom_kill_count("sbx-0000abcd", v2) == 1
