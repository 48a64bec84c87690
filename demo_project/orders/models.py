"""Orders: the business change that publishes ``orders.created`` in its transaction."""

from __future__ import annotations

from typing import ClassVar

from django.db import models


class Order(models.Model):
    customer_email = models.EmailField(help_text="Who gets the confirmation e-mail.")
    sku = models.CharField(max_length=40, help_text="The product ordered.")
    quantity = models.PositiveIntegerField(default=1, help_text="How many.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="When it was placed.")

    objects: ClassVar[models.Manager[Order]] = models.Manager()

    class Meta:
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"order {self.pk}: {self.quantity} x {self.sku} for {self.customer_email}"
