"""Permissions of the API: the same model permissions as the admin.

* reading dead letters: ``reliable_events.view_deadletter``;
* retrying them: ``reliable_events.retry_deadletter``;
* discarding them: ``reliable_events.discard_deadletter``;
* editing one's payload and retrying the copy: ``reliable_events.edit_deadletter``;
* a message's timeline: ``reliable_events.view_deadletter``;
* outbox stats: ``reliable_events.view_outboxmessage``;
* retrying dead outbox rows: ``reliable_events.change_outboxmessage``.

Anonymous requests are refused (401 or 403, depending on the project's authentication
classes); an authenticated user without the permission gets 403.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

APP_LABEL = "reliable_events"

#: view action -> permission codename.
DEADLETTER_PERMISSIONS = {
    "list": "view_deadletter",
    "retrieve": "view_deadletter",
    "groups": "view_deadletter",
    "timeline": "view_deadletter",
    "retry": "retry_deadletter",
    "bulk_retry": "retry_deadletter",
    "discard": "discard_deadletter",
    "bulk_discard": "discard_deadletter",
    "edit_retry": "edit_deadletter",
}
OUTBOX_PERMISSIONS = {
    "stats": "view_outboxmessage",
    "retry_dead": "change_outboxmessage",
}


class _ActionPermission(BasePermission):
    mapping: dict[str, str] = {}
    message = "You do not have permission to do this."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if not user or not user.is_authenticated:
            return False
        codename = self.mapping.get(getattr(view, "action", None) or "")
        if codename is None:
            return False  # an action nobody mapped is nobody's
        self.message = f"You need the {APP_LABEL}.{codename} permission."
        return bool(user.has_perm(f"{APP_LABEL}.{codename}"))


class DeadLetterPermission(_ActionPermission):
    mapping = DEADLETTER_PERMISSIONS


class OutboxPermission(_ActionPermission):
    mapping = OUTBOX_PERMISSIONS
