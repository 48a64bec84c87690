"""Placing an order: the row and its event commit or roll back together."""

from __future__ import annotations

from django.db import transaction

from demo_project.orders.models import Order
from reliable_events import publish_event

TOPIC = "orders.created"


def place_order(*, customer_email: str, sku: str, quantity: int) -> Order:
    with transaction.atomic():
        order = Order.objects.create(customer_email=customer_email, sku=sku, quantity=quantity)
        publish_event(
            TOPIC,
            {
                "order_id": order.pk,
                "customer_email": customer_email,
                "sku": sku,
                "quantity": quantity,
            },
            key=f"order-{order.pk}",
        )
    return order
