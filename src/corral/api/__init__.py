"""The HTTP side: the ASGI app, auth, native routes and the faces."""
