"""One module per concern; each exposes `configure(inp, dom)` and is tested on its own."""
