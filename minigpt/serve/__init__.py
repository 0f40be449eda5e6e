"""Serving a consolidated model over HTTP in the OpenAI wire format, with a web chat page at `/`.

`openai_api` speaks the wire format (plain JSON, no `openai` import), `worker` owns the model on one
thread, `server` routes requests on the standard library HTTP server, `connections` caps and times its
connections, `access` says who may call it, `static/index.html` is the page. See docs/serving.md.
"""
