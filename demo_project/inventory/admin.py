from django.contrib import admin

from demo_project.inventory.models import Reservation, Stock


@admin.register(Stock)
class StockAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("sku", "available")


@admin.register(Reservation)
class ReservationAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("order_id", "sku", "quantity", "reserved_at")
    search_fields = ("=order_id",)
