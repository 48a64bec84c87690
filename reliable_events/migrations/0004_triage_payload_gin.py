"""A GIN index on dead-letter payloads (PostgreSQL only) for the payload search.

``jsonb_path_ops`` answers containment (``payload @> '{"order_id": 42}'``), the one
operator the search uses there.  SQLite has no such index or operator: nothing to do.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

INDEX = "re_deadletter_payload_gin"


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        table = apps.get_model("reliable_events", "DeadLetter")._meta.db_table
        schema_editor.execute(
            f'CREATE INDEX IF NOT EXISTS {INDEX} ON "{table}" USING gin (payload jsonb_path_ops)'
        )


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("reliable_events", "0003_triage_audit")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
