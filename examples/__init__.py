"""Runnable examples of extending the bridge (see README)."""
