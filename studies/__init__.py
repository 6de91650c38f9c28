"""Ready-to-run studies, including the built-in demo family."""
