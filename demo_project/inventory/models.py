"""Stock and reservations, written by the ``inventory.reserve-stock`` consumer."""

from __future__ import annotations

from typing import ClassVar

from django.db import models


class Stock(models.Model):
    sku = models.CharField(max_length=40, unique=True, help_text="Product code.")
    available = models.IntegerField(
        default=0, help_text="Units not reserved (may go negative: backorder)."
    )

    objects: ClassVar[models.Manager[Stock]] = models.Manager()

    def __str__(self) -> str:
        return f"{self.sku}: {self.available}"


class Reservation(models.Model):
    order_id = models.BigIntegerField(unique=True, help_text="One reservation per order.")
    sku = models.CharField(max_length=40, help_text="Product code.")
    quantity = models.PositiveIntegerField(help_text="Units reserved.")
    message_id = models.CharField(max_length=255, help_text="The event that made it.")
    reserved_at = models.DateTimeField(auto_now_add=True, help_text="When it was made.")

    objects: ClassVar[models.Manager[Reservation]] = models.Manager()

    class Meta:
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"order {self.order_id}: {self.quantity} x {self.sku}"
