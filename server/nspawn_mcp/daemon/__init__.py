"""The daemon: the one process per host that owns every sandbox (see DESIGN.md).

- :mod:`.handshake`: the first line of a front end's connection, and the daemon's answer;
- :mod:`.sessions`: one MCP session per connection to the daemon's socket;
- :mod:`.main`: the daemon process (lock, namespaces, service, listeners, readiness);
- :mod:`.unit`: the daemon as a systemd unit, started on demand by the front ends.
"""
