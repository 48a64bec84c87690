"""REST API for dead-letter triage and outbox stats (mount with ``include()``)."""
