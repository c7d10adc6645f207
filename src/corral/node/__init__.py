"""Nodes run sandboxes: the built-in local node, and (later) remote agents, behind one interface."""
