"""The HTTP server of `reft run PLAN --serve`: routes (app.py), request models (protocol.py), API
semantics (openai_serving.py), Prometheus metrics (metrics.py), the chat page (static/index.html)
and the launcher (serve.py)."""
