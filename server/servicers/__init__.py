"""Thin gRPC servicers: translate the request, call one domain operation, translate
the result. Methods of the published API whose feature has not landed answer
``UNIMPLEMENTED`` naming the feature (see :func:`complete_servicer`)."""
