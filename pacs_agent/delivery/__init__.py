"""Delivery of produced objects to destinations: the Target protocol, its transports and the dispatcher."""
