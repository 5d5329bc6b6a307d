"""feature: turns the event stream into fresh user and item features and keeps the item catalogue."""
