"""Observability: structured logs, counters, the status model and its renderers (status,
/metrics, systemd STATUS=), and the control socket."""
