from tests.api_server.serve_helpers import server

__all__ = ["server"]
