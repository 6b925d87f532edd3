"""The stream server: console, exec, logs and proxy over websockets, behind verified tokens.

Layout (one job per module):
- auth.py     — JWT verification (RS256 from the controller, HS256 for the debug mode) and
                minting of local tokens; the claims Cattle puts in each kind of token.
- server.py   — the websocket server: paths, token check during the handshake, pings,
                bounded send buffers, routing to a StreamHandler.
- console.py  — serial console (libvirt console stream, several viewers, scrollback) and VNC.
- exec.py     — commands in the guest through qemu-guest-agent.
- logs.py     — the serial console log: last N lines, then follow.
- proxy.py    — HTTP and raw TCP to a port on the VM's address.
- actions.py  — compute.instance.console/.execute/.logs/.proxy events → {url, token}.

A handler gets the open websocket, the verified claims and the VM's instance uuid:

    class StreamHandler(Protocol):
        async def __call__(self, ws: websockets.asyncio.server.ServerConnection,
                           claims: Claims) -> None: ...
"""
