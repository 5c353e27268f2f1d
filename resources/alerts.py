"""Alert sink for drift alerts: the Dagster log and the ``alerts`` Delta table always, a webhook and Slack
when configured.

Every alert is one row of the append-only ``alerts`` table (``<root>/delta/alerts``), so the history
survives UI retention and can be queried like any other table. Alerts carry a deterministic ``alert_id``
(the caller derives it from what was compared), and :meth:`AlertSink.emit` skips ids already in the table,
so a sensor tick that is retried never alerts twice.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import dagster as dg
import polars as pl

ALERTS_TABLE = "alerts"

ALERT_SCHEMA = {
    "alert_id": pl.String, "created_at": pl.Datetime("us", "UTC"), "source": pl.String, "severity": pl.String,
    "asset": pl.String, "shard": pl.String, "title": pl.String, "message": pl.String, "details": pl.String,
}


@dataclass
class Alert:
    """One alert. ``severity`` is ``WARN`` or ``ERROR``; ``details`` is JSON-serialisable."""

    alert_id: str
    source: str
    severity: str
    asset: str
    shard: Optional[str]
    title: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def __post_init__(self) -> None:
        if self.severity not in ("WARN", "ERROR"):
            raise ValueError(f"alert severity must be WARN or ERROR, got {self.severity!r}")

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        row["details"] = json.dumps(self.details, sort_keys=True, default=str)
        return row


class AlertSink(dg.ConfigurableResource):
    """Where alerts go.

    - always: the Dagster log of the caller and the ``alerts`` Delta table of the data root passed to
      :meth:`emit`;
    - ``webhook_url``: an HTTP POST of the alert as JSON;
    - ``slack_channel`` + ``slack_token``: a Slack message through ``dagster-slack`` (``pip install curation-assets[slack]``); configured without
      the package installed, emit logs an error and carries on.

    Delivery failures of the webhook or Slack are logged and recorded in the result, never raised: the
    table row is the alert of record. :func:`alert_sink_from_env` binds the fields to the environment variables
    of :data:`ALERT_ENV` through ``dg.EnvVar``, so secrets are resolved when a run starts and never appear in
    the UI.
    """

    webhook_url: Optional[str] = None
    slack_channel: Optional[str] = None
    slack_token: Optional[str] = None
    timeout_s: float = 10.0

    def _webhook(self) -> Optional[str]:
        return self.webhook_url or None

    def _slack(self) -> tuple[Optional[str], Optional[str]]:
        return self.slack_channel or None, self.slack_token or None

    def known_ids(self, storage) -> set[str]:
        if not storage.exists(ALERTS_TABLE):
            return set()
        return set(storage.read(ALERTS_TABLE, columns=["alert_id"])["alert_id"].to_list())

    def read(self, storage) -> pl.DataFrame:
        """Every alert recorded under the data root (an empty frame with the schema when none)."""
        if not storage.exists(ALERTS_TABLE):
            return pl.DataFrame(schema=ALERT_SCHEMA)
        return storage.read(ALERTS_TABLE).sort("created_at")

    def emit(self, alerts: Sequence[Alert], storage, log: Optional[logging.Logger] = None) -> dict[str, Any]:
        """Send alerts that are not in the table yet; returns what was delivered where."""
        log = log or logging.getLogger("curation.alerts")
        known = self.known_ids(storage)
        fresh, seen = [], set()
        for alert in alerts:
            if alert.alert_id not in known and alert.alert_id not in seen:
                fresh.append(alert)
                seen.add(alert.alert_id)
        result: dict[str, Any] = {"emitted": len(fresh), "skipped_duplicates": len(alerts) - len(fresh),
                                  "webhook": None, "slack": None}
        if not fresh:
            return result
        for alert in fresh:
            line = f"[{alert.severity}] {alert.title}: {alert.message}"
            (log.error if alert.severity == "ERROR" else log.warning)(line)
        storage.append(ALERTS_TABLE, pl.DataFrame([a.row() for a in fresh], schema=ALERT_SCHEMA))
        url = self._webhook()
        if url:
            result["webhook"] = self._post_webhook(url, fresh, log)
        channel, token = self._slack()
        if channel and token:
            result["slack"] = self._post_slack(channel, token, fresh, log)
        return result

    def _post_webhook(self, url: str, alerts: Sequence[Alert], log) -> str:
        import requests

        delivered = 0
        for alert in alerts:
            try:
                response = requests.post(url, data=json.dumps(alert.row(), default=str),
                                         headers={"Content-Type": "application/json"}, timeout=self.timeout_s)
                response.raise_for_status()
                delivered += 1
            except Exception as exc:  # delivery is best effort; the table keeps the alert
                log.error(f"alert webhook {url} failed for {alert.alert_id}: {exc}")
        return f"{delivered}/{len(alerts)} delivered"

    def _post_slack(self, channel: str, token: str, alerts: Sequence[Alert], log) -> str:
        try:
            from dagster_slack import SlackResource
        except ImportError:
            log.error("Slack alerts are configured but dagster-slack is not installed: pip install dagster-slack")
            return "dagster-slack not installed"
        delivered = 0
        client = SlackResource(token=token).get_client()
        for alert in alerts:
            try:
                client.chat_postMessage(channel=channel, text=f":warning: *{alert.title}*\n{alert.message}")
                delivered += 1
            except Exception as exc:
                log.error(f"Slack alert to {channel} failed for {alert.alert_id}: {exc}")
        return f"{delivered}/{len(alerts)} delivered"


ALERT_ENV = {"webhook_url": "CURATION_ALERT_WEBHOOK", "slack_channel": "CURATION_SLACK_CHANNEL",
             "slack_token": "CURATION_SLACK_TOKEN"}


def alert_sink_from_env() -> AlertSink:
    """An :class:`AlertSink` whose destinations come from the :data:`ALERT_ENV` variables that are set."""
    return AlertSink(**{name: dg.EnvVar(var) for name, var in ALERT_ENV.items() if os.environ.get(var)})
