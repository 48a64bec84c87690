from django.apps import AppConfig


class InventoryConfig(AppConfig):
    name = "demo_project.inventory"
    label = "inventory"
    default_auto_field = "django.db.models.BigAutoField"
