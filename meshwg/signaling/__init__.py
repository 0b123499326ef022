"""What the node and the signal server say to each other, as bytes: pure codecs, no I/O, no clocks.

protocol    control channel frames and messages (Noise IK handshake frames, msgpack maps), directory entries
noise       Noise IK for the control channel (initiator and responder)
relay_wire  relay frames (HELLO, HELLO_OK, SEND, RECV, NOTICE) on UDP and TCP
invite      invite strings (server addresses, pinned server key, secret)
sealed      NaCl boxes between nodes, forwarded by the server unread

The trio clients that speak these are in meshwg.control; the server's shells in signal_server.
"""
