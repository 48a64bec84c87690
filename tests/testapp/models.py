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


class KeySequence(models.Model):
    """The last sequence number an ordered consumer applied for a key (the ordered
    ledger's handler checks each event against it, under a row lock)."""

    consumer = models.CharField(max_length=200, help_text="Consumer that applied it.")
    key = models.CharField(max_length=255, help_text="Ordering key.")
    seq = models.BigIntegerField(default=0, help_text="Last sequence number applied.")

    class Meta:
        constraints = (
            models.UniqueConstraint(fields=("consumer", "key"), name="key_sequence_once"),
        )

    def __str__(self) -> str:
        return f"{self.consumer}:{self.key}={self.seq}"
