"""The gRPC edge of Stitchgraph: configuration, the server factory, interceptors,
thin servicers and the ``stitchgraph`` command line."""
