from django.contrib import admin

from demo_project.notifications.models import MailDomain, Notification


@admin.register(MailDomain)
class MailDomainAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("name", "behaviour")
    list_editable = ("behaviour",)


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("order_id", "email", "attempt", "sent_at")
    search_fields = ("=order_id", "email")
