"""The HTTP layer: the app factory (``app``), its routers, and how errors, uploads, auth,
request logging and the web page are handled. Nothing below this package knows about HTTP."""
