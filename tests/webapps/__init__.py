"""Tiny Flask and Django apps that the integration tests serve with gunicorn."""
