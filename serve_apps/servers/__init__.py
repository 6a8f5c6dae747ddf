"""Servers: what one deployment runs, on any target (Ray Serve, Modal, in-process).

A server owns one engine and speaks the wire schemas; the target adapters (``ray_app``,
``modal_adapter``) only wrap it. Methods that stream are async generators.
"""
