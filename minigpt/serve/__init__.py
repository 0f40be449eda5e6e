"""Serving a consolidated model over HTTP in the OpenAI wire format, with a web chat page at `/`.

`openai_api` speaks the wire format (plain JSON, no `openai` import), `worker` owns the model on one
thread, `server` is the standard library HTTP server, `static/index.html` the page. See docs/serving.md.
"""
