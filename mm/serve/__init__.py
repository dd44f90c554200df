"""``mm serve``: an HTTP service and web page over one model and its ``mm embed`` indexes (FastAPI + uvicorn,
the ``serve`` extra). ``app`` (routes, auth, errors), ``batcher`` (dynamic batching), ``engine`` (the model
calls), ``indexes`` (search and source images), ``limits`` (what a request may send), ``bodies`` (JSON /
multipart bodies), ``schemas`` (the API's bodies), ``metrics`` (Prometheus text), ``server`` (uvicorn),
``static/`` (the page). Nothing in the library imports this package; only ``mm.cli.serve`` does, when run."""
