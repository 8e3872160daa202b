from __future__ import annotations

import pytest

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
