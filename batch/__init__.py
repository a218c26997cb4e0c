"""Offline inspection of image folders through the service's runner and detector."""
