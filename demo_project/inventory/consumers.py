"""Reserve stock for every new order, exactly once in effect."""

from __future__ import annotations

from django.db.models import F

from demo_project.inventory.models import Reservation, Stock
from reliable_events.consumer import Event, EventConsumer


class ReserveStock(EventConsumer):
    name = "inventory.reserve-stock"
    topics = ["orders.created"]
    max_retries = 5
    retry_delays = [1, 2, 5, 10, 30]

    def handle(self, event: Event) -> None:
        order = event.payload
        # The framework records the message id in this transaction, so a redelivery
        # does nothing; the unique order_id is a second line of defence for the case
        # where the same order is published twice under different message ids.
        _, created = Reservation.objects.get_or_create(
            order_id=order["order_id"],
            defaults={"sku": order["sku"], "quantity": order["quantity"], "message_id": event.id},
        )
        if created:
            Stock.objects.get_or_create(sku=order["sku"], defaults={"available": 100})
            Stock.objects.filter(sku=order["sku"]).update(
                available=F("available") - order["quantity"]
            )
