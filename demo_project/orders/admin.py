from django.contrib import admin

from demo_project.orders.models import Order


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("id", "customer_email", "sku", "quantity", "created_at")
    search_fields = ("customer_email", "=sku")
