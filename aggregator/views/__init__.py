"""HTTP endpoints: thin blueprints over config, fan-out and merge."""
