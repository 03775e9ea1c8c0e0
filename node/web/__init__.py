"""The node's HTTP server: console pages, login, the JSON API, /metrics, /healthz and /readyz.

One Starlette application (``node.web.app.build_app``) under uvicorn (``node.web.server.WebServer``),
started by ``harmonode serve`` and ``harmonode listen``. Other parts of the node (DICOMweb, the learning
server) mount their routes into the same application and inherit its login.
"""
