"""The four freshrec services; each runs as ``python -m services.<name>`` and deploys on its own.

Services never import each other: they talk over gRPC and NATS.
"""
