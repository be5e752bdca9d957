"""Server interceptors, outermost first: request context and access log, metrics,
error translation, authentication. See :func:`server.interceptors.chain.default_chain`."""
