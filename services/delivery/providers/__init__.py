"""Provider adapters behind one interface, and the HTTP machinery under them."""
