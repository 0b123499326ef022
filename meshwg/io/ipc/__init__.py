"""Local IPC: the UAPI socket (served and as a client) and the agent's status socket."""
