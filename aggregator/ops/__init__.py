"""What operators run: the `aggregator` command and what each of its commands does.

Nothing in the core, the views or the app imports this package; only `ops.serve` (inside each
Hypercorn worker) builds the Flask app.
"""
