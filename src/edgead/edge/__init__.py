"""The edge/server split: codecs on the backbone/head cut, their payload format, the server and the client.

Modules are imported where used (the server pulls in FastAPI, the client httpx), so importing
``edgead.edge`` stays light.
"""
