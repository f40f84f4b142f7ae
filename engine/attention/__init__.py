"""Decode attention over the paged KV cache: one interface, one implementation per kind of device."""
