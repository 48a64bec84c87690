"""``retry_dead_letters``: re-deliver open dead letters to their consumer's queue only.

Select with ``--id ID [ID ...]``, ``--consumer NAME``, ``--fingerprint FP`` (combined
with AND) or ``--all``; only open dead letters are retried.  Each one becomes an outbox
row addressed to that consumer's queue (never the topic's other subscribers), with the
same message id, and is marked ``retried`` in the same transaction; the row is published
with a broker confirm right after the commit (or by the relay, if that fails).  The same
service (:func:`reliable_events.deadletters.retry`) backs the admin and the API.

Before retrying, the topology of the consumers involved is declared, so that their queues
exist; dead letters of a consumer that is not registered in this process are skipped
unless ``--force`` (its queue may not exist: the broker would return the retry, which
then fails with backoff until its row is dead).

Exit codes: 0 done (also when nothing matched); 1 bad arguments; 3 some of the selected
dead letters could not be retried (listed with the reason).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from reliable_events import deadletters
from reliable_events.consumer.base import registry
from reliable_events.db import write_alias
from reliable_events.management.arguments import BadArgumentsExit1, database_alias, row_id
from reliable_events.models import OutboxMessage

EXIT_SOME_SKIPPED = 3


class Command(BadArgumentsExit1, BaseCommand):
    help = "Re-deliver open dead letters to their consumer's queue and mark them retried."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--id", dest="ids", type=row_id, nargs="+", action="extend", default=None, metavar="ID"
        )
        parser.add_argument("--consumer", default=None, metavar="NAME", help="One consumer's.")
        parser.add_argument("--fingerprint", default=None, help="One failure group's.")
        parser.add_argument("--all", action="store_true", help="Every open dead letter.")
        parser.add_argument("--dry-run", action="store_true", help="Only list what would go.")
        parser.add_argument("--note", default="", help="Why (stored on each dead letter).")
        parser.add_argument("--user", default="", help="Who (stored on each dead letter).")
        parser.add_argument("--database", type=database_alias, default=None, help="Database alias.")
        parser.add_argument(
            "--force",
            action="store_true",
            help="Also retry dead letters of consumers not registered here (their queue "
            "must exist, or the broker drops the re-delivery).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ids, consumer, fp = options["ids"], options["consumer"], options["fingerprint"]
        everything = options["all"]
        if everything and (ids or consumer or fp):
            raise CommandError("--all cannot be combined with --id, --consumer or --fingerprint")
        if not (everything or ids or consumer or fp):
            raise CommandError(
                "choose dead letters: --id ID ..., --consumer NAME, --fingerprint FP or --all"
            )
        using = options["database"]
        selected = list(
            deadletters.select(
                ids=ids, consumer=consumer, fingerprint=fp, everything=everything, using=using
            )
        )
        if ids:  # name the ids that are not open (or do not exist) too
            found = {letter.pk for letter in selected}
            missing = [pk for pk in ids if pk not in found]
        else:
            missing = []
        dry_run = options["dry_run"]
        result = deadletters.retry(
            selected,
            user=options["user"] or "retry_dead_letters",
            note=options["note"],
            source="command",
            using=using,
            dry_run=dry_run,
            force=options["force"],
        )
        for warning in result.warnings:
            self.stderr.write(f"warning: {warning}")
        if consumer and not selected and consumer not in registry.names():
            self.stderr.write(
                f"warning: no consumer named {consumer!r} is registered and none of the open "
                "dead letters is its: a typo? (consume_events --list names them)"
            )
        by_id = {letter.pk: letter for letter in selected}
        verb = "would retry" if dry_run else "retried"
        for pk in result.done:
            letter = by_id[pk]
            where = (
                f"queue {letter.queue or letter.consumer}"
                if deadletters.ordered_consumer(letter) is None
                else "its key released (the ordered consumer applies it in order)"
            )
            self.stdout.write(
                f"{verb} #{pk} {letter.consumer} {letter.message_id} ({letter.reason}) -> {where}"
            )
        skipped = dict(result.skipped)
        for pk in result.unregistered:
            skipped[pk] += "; --force to retry anyway"
        for pk in missing:
            skipped.setdefault(pk, "no open dead letter with this id")
        for pk, reason in sorted(skipped.items()):
            self.stderr.write(f"skipped #{pk}: {reason}")
        summary = result.summary("would retry" if dry_run else "retried")
        if result.outbox_ids:
            alias = write_alias(OutboxMessage, using)
            sent = (
                OutboxMessage.objects.using(alias)
                .filter(pk__in=result.outbox_ids, status=OutboxMessage.Status.SENT)
                .count()
            )
            summary += f"; {sent} confirmed by the broker now, {len(result.outbox_ids) - sent} "
            summary += "left to the relay"
        self.stdout.write(f"retry_dead_letters: {summary}")
        if skipped:
            raise CommandError(
                f"{len(skipped)} dead letter(s) could not be retried", returncode=EXIT_SOME_SKIPPED
            )
