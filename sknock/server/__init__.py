"""The knock server's edges: configuration, capture, firewall backends, CRL fetching, privilege
separation, and the daemon that wires them to the sans-I/O verifier."""
