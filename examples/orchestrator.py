"""An orchestrator that allocates one sandbox per task over streamable HTTP.

Start the server first:  .venv/bin/nspawn-mcp serve --http 127.0.0.1:8765
Then run:                .venv/bin/python examples/orchestrator.py
"""

from __future__ import annotations

import anyio
from mcp.client import Client

TASKS = {
    "sum": "print(sum(range(1_000_000)))",
    "platform": "import platform; print(platform.platform())",
    "fails": "raise SystemExit(3)",
}


async def run_task(client: Client, name: str, code: str) -> None:
    created = await client.call_tool("create_sandbox", {"ttl_seconds": 300})
    assert created.structured_content is not None
    sandbox = created.structured_content["sandbox_id"]
    try:
        result = await client.call_tool(
            "exec_in_sandbox",
            {"sandbox_id": sandbox, "command": ["python3", "-c", code], "timeout_seconds": 30},
        )
        outcome = result.structured_content or {}
        print(f"{name}: exit={outcome.get('exit_code')} stdout={outcome.get('stdout', '').strip()!r}")
    finally:
        await client.call_tool("destroy_sandbox", {"sandbox_id": sandbox})


async def main() -> None:
    async with Client("http://127.0.0.1:8765/mcp") as client, anyio.create_task_group() as tasks:
        for name, code in TASKS.items():
            tasks.start_soon(run_task, client, name, code)


if __name__ == "__main__":
    anyio.run(main)
