"""The read path: stats, status, drift, events, the exporter, and what runs now (show)."""
