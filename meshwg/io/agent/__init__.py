"""`meshwg join`: the node agent and its shells (the mesh device, the relay, netcheck) and its state directory."""
