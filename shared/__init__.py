"""Code that two or more freshrec services use: settings pieces, the gRPC server bootstrap,
NATS and database helpers, the model store layout, logging and metrics.

Nothing here imports PyTorch: the inference service imports this package and its image
must not carry torch.
"""
