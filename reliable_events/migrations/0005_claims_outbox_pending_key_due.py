from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("reliable_events", "0004_triage"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="outboxmessage",
            index=models.Index(
                condition=models.Q(("status", "pending")),
                fields=["key", "next_attempt_at"],
                name="re_outbox_pending_key_due",
            ),
        ),
    ]
