"""Serving plumbing: settings, model store, metrics, the runner and API logic, the web page."""
