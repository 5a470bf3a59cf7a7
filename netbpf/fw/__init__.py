"""Firewall classifier: policy IR -> lookup tables (compile), their map writer, address tables, reject programs."""
