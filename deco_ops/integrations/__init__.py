"""Bridges to other libraries. Each submodule imports its library on import and raises a clear
error (with the pip command) when it is missing; ``import deco_ops`` never imports them."""
