"""HTTP serving: protocol (OpenAI schemas), service (text <-> engine, limits), app (routes, SSE), router (replicas).

Nothing here is imported by `import gptforge`; the server stack (fastapi, uvicorn) loads only when a serve command runs.
"""
