"""The five seed APIs ("faces"): thin translations over the core, one module per seed.

A face parses its vendor's request shape, calls the core services, and renders its vendor's
response, stream and error shapes. No face holds state or logic of its own.
"""
