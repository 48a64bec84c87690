"""Business models used by the tests (the 'effects' consumers apply)."""

from __future__ import annotations

from django.db import models


class Order(models.Model):
    reference = models.CharField(max_length=100, help_text="Order reference.")

    def __str__(self) -> str:
        return self.reference


class Effect(models.Model):
    """One row per applied event: a unique constraint catches any double application."""

    consumer = models.CharField(max_length=200, help_text="Consumer that applied it.")
    message_id = models.CharField(max_length=255, help_text="Event id.")
    payload = models.JSONField(default=dict, help_text="Payload seen.")

    class Meta:
        constraints = (
            models.UniqueConstraint(fields=("consumer", "message_id"), name="effect_once"),
        )

    def __str__(self) -> str:
        return f"{self.consumer}:{self.message_id}"
