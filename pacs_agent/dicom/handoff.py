"""The receiver pool's hand-over server: a pynetdicom server fed with connections another process accepted."""

from __future__ import annotations

import socket
import threading
from typing import Any, cast

from pynetdicom.transport import ThreadedAssociationServer


class HandedOverAssociationServer(ThreadedAssociationServer):
    """A pynetdicom server that does not listen: another process accepts the TCP connections and
    sends each one over a Unix socket (``SCM_RIGHTS``); this server's ``serve_forever`` loop waits on
    that socket instead of a listening one and handles each received connection exactly as an accepted
    one (TLS wrap, one association thread). Used by the processes of `pacs_agent.dicom.scp_pool`.
    """

    def __init__(self, *args: Any, handoff: socket.socket, public_address: tuple[str, int], **kwargs: Any) -> None:
        self._handoff = handoff
        self._public_address = public_address
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # socketserver made a TCP socket for us: use the hand-over socket instead, bind nothing.
        if self.socket is not None:
            self.socket.close()
        self.socket = self._handoff
        self.server_address = self._public_address

    def server_activate(self) -> None:
        """Nothing to listen on: the pool's listener accepts."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        _message, fds, _flags, _address = socket.recv_fds(self._handoff, 64, 1)
        if not fds:
            raise OSError("the receiver pool closed the hand-over socket")
        client = socket.socket(fileno=fds[0])
        try:
            peer = client.getpeername()
            if self.ssl_context:
                client = self.ssl_context.wrap_socket(client, server_side=True)
        except OSError:
            client.close()  # the peer went away before we got to it
            raise
        return client, (str(peer[0]), int(peer[1]))


def start_handed_over_server(
    ae: Any,
    handoff: socket.socket,
    public_address: tuple[str, int],
    ssl_context: Any,
    evt_handlers: list[Any],
) -> HandedOverAssociationServer:
    """What ``AE.start_server(block=False)`` does, with a `HandedOverAssociationServer`."""
    server = ae.make_server(
        public_address, ssl_context=ssl_context, evt_handlers=evt_handlers,
        server_class=HandedOverAssociationServer, handoff=handoff, public_address=public_address,
    )
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer-handoff", daemon=True)
    thread.start()
    ae._servers.append(server)  # so that AE.shutdown() stops it, as for start_server
    return cast(HandedOverAssociationServer, server)
