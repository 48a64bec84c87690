"""``/api/orders/``: create (publishes ``orders.created``) and list orders."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from demo_project.orders.models import Order
from demo_project.orders.services import place_order


class OrderSerializer(serializers.ModelSerializer[Order]):
    class Meta:
        model = Order
        fields = ("id", "customer_email", "sku", "quantity", "created_at")
        read_only_fields = ("id", "created_at")

    def validate_quantity(self, value: int) -> int:
        if value < 1:
            raise serializers.ValidationError("order at least one.")
        return value


class OrderViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet[Order],
):
    serializer_class = OrderSerializer
    permission_classes = (IsAuthenticated,)

    def get_queryset(self) -> QuerySet[Order]:
        return Order.objects.all()

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = OrderSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        order = place_order(**serializer.validated_data)
        return Response(OrderSerializer(order).data, status=status.HTTP_201_CREATED)
