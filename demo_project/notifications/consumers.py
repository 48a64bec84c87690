"""Send an order confirmation; some mail domains fail, transiently or for good.

* ``flaky.example`` fails the first two attempts (retried, then sent);
* ``down.example`` times out every time (retries exhausted: a dead letter; mark the
  domain "ok" in admin, then retry the dead letters: they go through);
* ``bounce.example`` bounces (``PermanentError``: a dead letter at once).
"""

from __future__ import annotations

from demo_project.notifications.models import MailDomain, Notification
from reliable_events.consumer import Event, EventConsumer
from reliable_events.exceptions import PermanentError


class MailServerBusy(ConnectionError):
    """A transient SMTP failure (4xx): worth retrying."""


def send_mail(email: str, attempt: int) -> None:
    """Pretend to talk SMTP to the recipient's domain."""
    domain = email.rsplit("@", 1)[-1]
    behaviour = (
        MailDomain.objects.filter(name=domain).values_list("behaviour", flat=True).first()
        or MailDomain.Behaviour.OK
    )
    if behaviour == MailDomain.Behaviour.BOUNCES:
        raise PermanentError(f"550 {email}: mailbox does not exist")
    if behaviour == MailDomain.Behaviour.DOWN:
        raise MailServerBusy(f"{domain}: connection timed out after 10s")
    if behaviour == MailDomain.Behaviour.FLAKY and attempt < 3:
        raise MailServerBusy(f"421 {domain}: too many connections, try again later")


class SendConfirmation(EventConsumer):
    name = "notifications.send-confirmation"
    topics = ["orders.created"]
    max_retries = 3
    retry_delays = [1, 2, 3]

    def handle(self, event: Event) -> None:
        order = event.payload
        send_mail(order["customer_email"], event.attempt)
        Notification.objects.get_or_create(
            order_id=order["order_id"],
            defaults={
                "email": order["customer_email"],
                "attempt": event.attempt,
                "message_id": event.id,
            },
        )
