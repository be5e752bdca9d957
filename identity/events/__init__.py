"""Incoming events: the one shape every input is parsed into, and the pure source-payload parsers."""
