"""Data: one canonical conversation shape, format adapters that produce it, and the renderer
that turns it into ``input_ids`` and a loss mask."""
