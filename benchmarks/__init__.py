"""``make bench``: nspawn-mcp measured through a real MCP client over stdio, beside podman,
bubblewrap and the raw systemd-nspawn + machined floor, from the same template.

Run ``python -m benchmarks`` as root after ``make setup`` (``--quick`` for a short try,
``--density 1000`` for the full density run). It writes ``bench/results/<date>.json``,
``.md`` and ``.png`` and the README's table.

One module per measurement, the statistics and the report pure:

    stats.py       PURE  percentiles and summaries of samples
    results.py     PURE  what a measurement is (a latency distribution, a figure, a skip), as JSON
    targets.py     PURE  the targets of issue #11 and the baselines' nspawn-mcp counterparts
    report.py      PURE  the Markdown table, the README splice
    chart.py             the PNG of the latency distributions (matplotlib)
    session.py           the bench policies, the daemon they need, MCP clients over stdio
    lifecycle.py         create / first exec / exec / destroy, sequential, in bursts, sustained
    density.py           host memory per idle sandbox
    files.py             copy_file, read_file and write_file throughput
    forks.py             snapshots and forks, when the server offers them (snapshots.py)
    baselines.py         podman, bubblewrap and the raw nspawn floor (floor.sh)
    __main__.py          the run: sizes, order, output files

The older scripts beside them (file_tools.py, disk_quotas.py, frontend_overhead.py) are
single investigations run by hand; see their docstrings.
"""
