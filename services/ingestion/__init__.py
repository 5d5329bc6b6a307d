"""ingestion: validates behaviour events, keeps them in the SQL event log, publishes them to JetStream."""
