"""Serving plumbing: settings, access and the gate, which stored banks are served, metrics,
the runner and API logic, the web page."""
