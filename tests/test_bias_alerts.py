"""The alert sink: the alerts table always, idempotent ids, a real HTTP webhook, Slack without the package."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from resources.alerts import Alert, AlertSink
from resources.storage import DeltaStorage


def _alert(i: int, severity: str = "WARN") -> Alert:
    return Alert(alert_id=f"id-{i}", source="bias_drift", severity=severity, asset="demographic_ratios",
                 shard=f"{i:05d}", title=f"drift {i}", message="women share x0.5", details={"effect": 0.5})


def test_table_keeps_every_alert_once(tmp_path, caplog):
    storage = DeltaStorage(root=str(tmp_path))
    sink = AlertSink()
    assert sink.read(storage).height == 0
    with caplog.at_level(logging.WARNING):
        out = sink.emit([_alert(1), _alert(2, "ERROR"), _alert(1)], storage)
    assert out["emitted"] == 2 and out["skipped_duplicates"] == 1
    assert "drift 1" in caplog.text and "drift 2" in caplog.text
    assert sink.emit([_alert(2), _alert(3)], storage)["emitted"] == 1
    table = sink.read(storage)
    assert sorted(table["alert_id"].to_list()) == ["id-1", "id-2", "id-3"]
    assert json.loads(table.filter(table["alert_id"] == "id-1")["details"][0]) == {"effect": 0.5}
    with pytest.raises(ValueError):
        _alert(4, "INFO")


def test_webhook_receives_alerts_and_failures_do_not_raise(tmp_path, caplog):
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        storage = DeltaStorage(root=str(tmp_path))
        url = f"http://127.0.0.1:{server.server_port}/hook"
        out = AlertSink(webhook_url=url).emit([_alert(1), _alert(2)], storage)
        assert out["webhook"] == "2/2 delivered"
        assert [r["alert_id"] for r in received] == ["id-1", "id-2"] and received[0]["shard"] == "00001"
    finally:
        server.shutdown()
    # an unreachable webhook is logged; the table still keeps the alert
    with caplog.at_level(logging.ERROR):
        out = AlertSink(webhook_url=url, timeout_s=2).emit([_alert(3)], storage)
    assert out["webhook"] == "0/1 delivered" and "failed" in caplog.text
    assert AlertSink().read(storage).height == 3


def test_slack_without_package_is_reported_not_raised(tmp_path, caplog):
    try:
        import dagster_slack  # noqa: F401
        pytest.skip("dagster-slack is installed; this test covers the missing-package path")
    except ImportError:
        pass
    storage = DeltaStorage(root=str(tmp_path))
    with caplog.at_level(logging.ERROR):
        out = AlertSink(slack_channel="#data", slack_token="xoxb-test").emit([_alert(1)], storage)
    assert out["slack"] == "dagster-slack not installed" and "dagster-slack" in caplog.text
    assert AlertSink().read(storage).height == 1
