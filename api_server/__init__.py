"""Tessera's OpenAI-compatible HTTP server, `tessera serve` (see api_server.cli).

Modules: cli (command line, startup and shutdown), app (aiohttp routes and middleware),
protocol (request schemas, errors), serving (what the routes share), completions and
chat (the two generation routes), metrics (Prometheus metrics and the stats log).
"""
