"""An app with a task that spawns: an order fans out into one packing task per item."""
