"""Running the aggregator as a deployment on this machine: the multi-host local cluster."""
