import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("reliable_events", "0005_claims_outbox_pending_key_due"),
    ]

    operations = [
        migrations.CreateModel(
            name="LaneLease",
            fields=[
                (
                    "lane",
                    models.IntegerField(
                        help_text="The ordering lane.", primary_key=True, serialize=False
                    ),
                ),
                (
                    "owner",
                    models.CharField(
                        blank=True,
                        default="",
                        help_text="The holding relay ('' = free).",
                        max_length=64,
                    ),
                ),
                (
                    "expires_at",
                    models.DateTimeField(
                        db_default=django.db.models.functions.datetime.Now(),
                        help_text="The lease ends then unless renewed (database clock).",
                    ),
                ),
                (
                    "token",
                    models.BigIntegerField(
                        default=0, help_text="Fencing token: incremented at each acquisition."
                    ),
                ),
            ],
            options={
                "verbose_name": "lane lease",
                "verbose_name_plural": "lane leases",
                "ordering": ("lane",),
            },
        ),
        migrations.CreateModel(
            name="RelayPresence",
            fields=[
                (
                    "owner",
                    models.CharField(
                        help_text="The relay's id.",
                        max_length=64,
                        primary_key=True,
                        serialize=False,
                    ),
                ),
                (
                    "process",
                    models.CharField(
                        blank=True, default="", help_text="Host and process id.", max_length=255
                    ),
                ),
                (
                    "expires_at",
                    models.DateTimeField(
                        db_default=django.db.models.functions.datetime.Now(),
                        help_text="It stops counting then unless renewed (database clock).",
                    ),
                ),
            ],
            options={
                "verbose_name": "relay presence",
                "verbose_name_plural": "relay presences",
                "ordering": ("owner",),
            },
        ),
    ]
