"""Where events come in: datagram sockets (Unix and UDP) and, later, Forward-protocol streams."""
