"""Event handlers: one coroutine per Cattle event name, each returning its reply's data."""
