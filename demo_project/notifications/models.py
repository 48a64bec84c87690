"""Order confirmations, sent by the ``notifications.send-confirmation`` consumer."""

from __future__ import annotations

from typing import ClassVar

from django.db import models


class MailDomain(models.Model):
    """How the (simulated) mail server of a domain behaves; edit it in admin."""

    class Behaviour(models.TextChoices):
        OK = "ok", "accepts mail"
        FLAKY = "flaky", "busy: fails the first two attempts"
        DOWN = "down", "down: times out every time"
        BOUNCES = "bounces", "bounces: mailbox does not exist (permanent)"

    name = models.CharField(max_length=100, unique=True, help_text="e.g. flaky.example")
    behaviour = models.CharField(
        max_length=10,
        choices=Behaviour.choices,
        default=Behaviour.OK,
        help_text="What sending does.",
    )

    objects: ClassVar[models.Manager[MailDomain]] = models.Manager()

    def __str__(self) -> str:
        return f"{self.name} ({self.behaviour})"


class Notification(models.Model):
    order_id = models.BigIntegerField(unique=True, help_text="One confirmation per order.")
    email = models.EmailField(help_text="Recipient.")
    attempt = models.PositiveIntegerField(help_text="Handler attempt that succeeded.")
    message_id = models.CharField(max_length=255, help_text="The event that made it.")
    sent_at = models.DateTimeField(auto_now_add=True, help_text="When it was sent.")

    objects: ClassVar[models.Manager[Notification]] = models.Manager()

    class Meta:
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"order {self.order_id} -> {self.email}"
