"""Code that runs inside a sandbox (with the image's own python3), not in the server."""
