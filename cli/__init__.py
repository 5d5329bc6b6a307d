"""The ``freshrec`` command line: the embedded stack and operator verbs (not a service)."""
