"""Off-site replication: the queue, transports, bandwidth, catalog snapshots."""
