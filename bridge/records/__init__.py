"""Call records: what was said, what the caller heard, how fast each turn was, what tools did.

``facts`` holds the typed facts the call core hands the recorder; ``record`` is the pure builder;
``recorder`` the per-call port implementation; ``live`` the in-process hub for the console;
``store`` the SQLite / PostgreSQL persistence; ``webhook`` the post-call delivery.
"""
