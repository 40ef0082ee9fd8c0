"""``stemserve web``: the upload page and HTTP API over the same client library as the CLI.

Nothing is imported here, so that the command line can read :mod:`.settings` without the
``web`` extra (FastAPI, uvicorn) installed. From the bottom up: :mod:`.settings` (the
configuration, and the command line's flags), :mod:`.names` and :mod:`.options` (labels
and choices), :mod:`.jobs` (the queue and the store on disk), :mod:`.catalog` and
:mod:`.runner` (models and separating one job), :mod:`.service` (the job service, plain
Python); then HTTP: :mod:`.refusals` (errors to status codes), :mod:`.guards` (middleware),
:mod:`.app` (the router) and :mod:`.server` (uvicorn).
"""
