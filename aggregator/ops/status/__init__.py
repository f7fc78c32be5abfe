"""`aggregator status`: a terminal view of a running deployment, from its `/metrics` (no Flask)."""
