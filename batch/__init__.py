"""Offline inspection of image folders: in-process with the same detector code as the
service's runner (`detector.banks.models.load_pair`), or through a running service (`--url`)."""
