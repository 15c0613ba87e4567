"""The web console: a client of `CoordinatorService` that shows sagas and repairs them.

`saga console --coordinator HOST:PORT` serves it. It reads and acts through the Python SDK only,
like any other backend, so it works against any replica, with TLS and a token when those are
set; every asset it needs ships in this package.
"""
