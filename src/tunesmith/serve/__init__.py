"""``tunesmith serve``: an OpenAI-compatible API, a job runner and the no-code studio, in one process.

The top floor, beside :mod:`tunesmith.cli`: nothing below imports it. Pieces:

- :mod:`.workspace` — every path from the browser or the API resolved under the workspace;
- :mod:`.pool` — model ids (alias, workspace folder, run, export) to loaded models, adapters
  sharing one loaded base;
- :mod:`.batching` — concurrent generation requests collected for a few milliseconds and
  generated together, left-padded;
- :mod:`.openai_api` — ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``;
- :mod:`.jobs` — the SQLite job store and the worker that runs ``python -m tunesmith ...`` one at a time;
- :mod:`.studio_api` — ``/api/...``: files, data, recipe, plan, runs, preferences;
- :mod:`.app` — the FastAPI application: authentication, size limits, errors, static studio.
"""
