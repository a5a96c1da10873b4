"""isoboxd: the compute service's HTTP/JSON API on a unix socket (row 5).

- :mod:`isobox.api.server`: the HTTP server (stdlib ``http.server`` on ``AF_UNIX``), the
  router with path templates, request bodies, error mapping, chunked and upgraded streams.
- :mod:`isobox.api.handlers`: the routes, each a thin call into
  :class:`isobox.compute.service.ComputeService`.
- :mod:`isobox.api.openapi`: the OpenAPI 3.1 document built from the routes and the wire
  models in :mod:`isobox.spec`.
- :mod:`isobox.api.daemon`: ``isoboxd``'s ``main()``.
"""
